"""Two two-pass steps under each backend, on this rank's share of the global batch; rank 0 saves the
weights after them, for tests/test_parallel.py to compare with one process doing one-pass steps,
the weights of a fresh engine that loaded the engine's checkpoint, and those the export stage
consolidates from it. Variant `clip`: the plain problem with train.grad_clip=CLIP, whose global
gradient norms (before clipping) it saves too. Variants `bf16` and `bf16_comm`: the plain problem
with train.precision=bf16, and fp32 or bf16 weights gathered (parallel.param_dtype), whose weights,
checkpoint and the dtype of a weight inside the forward it saves (PRECISION_VARIANTS). The loss
variants (LOSS_VARIANTS), those of what trains (OPTION_VARIANTS: train.layer_decay, model.lora) and the
compiled one (COMPILE_VARIANTS: train.compile) save their weights and losses only.

    torchrun --nproc_per_node 2 tests/parallel_worker.py OUT_DIR ddp,zero1,... plain,frozen_ckpt,clip [ddp:simix,...]
"""
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from pipeline.config.schema import LoraConfig  # noqa: E402
from pipeline.parallel import checkpoint, distributed  # noqa: E402
from pipeline.parallel.distributed import world_from_env  # noqa: E402
from pipeline.parallel.engine import DeepSpeedEngine, build_engine, deepspeed_config  # noqa: E402
from pipeline.losses import RecallAtK, RecallAtKSiMix, set_step  # noqa: E402
from pipeline.models.encoders import build_encoder  # noqa: E402
from pipeline.train.compile import compile_blocks  # noqa: E402
from pipeline.train.optim import build_optimizer  # noqa: E402
from pipeline.train.two_pass import two_pass_step  # noqa: E402

GLOBAL, CHUNK, SEED, STEPS, LR = 16, 4, 5, 2, 0.5
VARIANTS = ("plain", "frozen_ckpt")
CLIP = 1.0  # below both steps' gradient norms (about 8.8 and 1.6): every step is clipped
# The plain model with another loss: RS@k + SiMix split across the ranks (virtual queries shared out
# too), and RS@k computed whole on every rank (the path of every loss that does not split).
LOSS_VARIANTS = ("simix", "whole_loss")
# What trains and at which lr (issue 39), through the finetune stage's optimizer factory: layer_decay saves
# weights and losses; lora also its checkpoint (of what trains only) exported and reloaded, as `plain`.
OPTION_VARIANTS = ("layer_decay", "lora")
# A new tower type (issue 37): DINOv3 in timm (RoPE, register tokens), activation checkpointing on and
# only its last block trainable; its blocks are what FSDP2 and ZeRO-3 shard.
TOWER_VARIANTS = ("dinov3",)
# train.compile (issue 39): the lora problem (drop-path, LoRA dropout, activation checkpointing) with each
# block compiled in place before the engine wraps the model, as the finetune stage does; weights and losses.
COMPILE_VARIANTS = ("compiled",)
PRECISION_VARIANTS = {"bf16": "fp32", "bf16_comm": "bf16"}  # variant -> parallel.param_dtype, under train.precision=bf16


def make_loss(variant: str):
    if variant == "simix":
        return RecallAtKSiMix(ks=(1, 2, 4), tau_rank=0.05, seed=SEED)
    return RecallAtK(ks=(1, 2, 4), tau_rank=0.05, split_across_ranks=variant != "whole_loss")


def problem(variant: str):
    """The model (drop-path on), the batches of each step, the loss. `frozen_ckpt`: the patch
    embedding and the first block frozen, activation checkpointing on. `lora`: peft's adapters (with
    their dropout) on every block's projections, the base frozen, activation checkpointing on; `compiled`: the
    same model (the worker compiles its blocks, the one-process reference stays eager)."""
    frozen_ckpt = variant == "frozen_ckpt"
    with_lora = variant in ("lora", "compiled")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.2) if with_lora else LoraConfig()
    cfg = ModelConfig(patch_size=8, depth=2, embed_dim=24, drop_path=0.2, lora=lora,
                      grad_checkpointing=frozen_ckpt or with_lora)
    if variant == "dinov3":
        cfg = ModelConfig(family="timm", arch="vit_small_patch16_dinov3", global_pool="token", patch_size=8, depth=2,
                          width=64, heads=2, embed_dim=24, drop_path=0.2, grad_checkpointing=True, trainable_blocks=1)
    model = build_encoder(cfg, seed=0).train()
    if variant == "dinov3":  # layer scales as trained (timm starts them at 1e-5: a class token blind to the image)
        for name, p in model.named_parameters():
            if ".gamma_" in name:
                torch.nn.init.constant_(p, 1.0)
    if frozen_ckpt:
        for part in (model.backbone.patch_embed, model.backbone.blocks[0]):
            part.requires_grad_(False)
        model.backbone.cls_token.requires_grad_(False)
        model.backbone.pos_embed.requires_grad_(False)
    batches = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(100 + step)
        labels = torch.arange(4).repeat_interleave(4)[torch.randperm(GLOBAL, generator=gen)]
        batches.append((torch.randn(GLOBAL, 3, 32, 32, generator=gen), labels))
    return model, batches, make_loss(variant)


def sgd(model: torch.nn.Module):
    """SGD, not AdamW: timm's attention key bias has an exactly zero gradient, so what is computed for
    it is rounding noise, which Adam's per-element normalisation turns into full-size steps that
    differ between any two exact methods; SGD keeps the comparison about the gradients."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)


def optimizer_for(variant: str):
    """The optimizer factory of a variant: `sgd`, or the stage's own (SGD, train.layer_decay=0.5: a
    parameter group per layer) for `layer_decay`."""
    if variant == "layer_decay":
        train = TrainConfig(optimizer="sgd", lr=LR, head_lr=LR, layer_decay=0.5, weight_decay=0.0, warmup_steps=0)
        return lambda model: build_optimizer(model, train)
    return sgd


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its shard under ZeRO-3 (ds_tensor) and FSDP2 (DTensor)."""
    total = 0
    for p in module.parameters():
        total += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return total


class SyncCounter:
    """Counts gradient synchronisations: DDP's bucket all-reduces (a comm hook) and FSDP2's
    reduce-scatters (one per FSDP unit and sync), so the test can check they happen once per step."""

    def __init__(self, engine, backend: str):
        self.calls = 0
        if backend == "ddp":
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
                allreduce_hook,
            )

            def hook(state, bucket):
                self.calls += 1
                return allreduce_hook(state, bucket)

            engine.model.register_comm_hook(None, hook)
        elif backend == "fsdp2":
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group

            original = _fsdp_param_group.foreach_reduce

            def counted(*args, **kwargs):
                self.calls += 1
                return original(*args, **kwargs)

            _fsdp_param_group.foreach_reduce = counted
            self.restore = lambda: setattr(_fsdp_param_group, "foreach_reduce", original)

    def close(self) -> None:
        getattr(self, "restore", lambda: None)()


def syncs_of_one_backward(engine, images: torch.Tensor, counter: SyncCounter) -> int:
    """The synchronisations of a single plain backward (no two-pass): one per DDP bucket or FSDP unit."""
    before = counter.calls
    engine.model(images).sum().backward()
    engine.optimizer.zero_grad(set_to_none=True)
    return counter.calls - before


def main(out: Path, combos: list[tuple[str, str]]) -> None:
    world = world_from_env()
    distributed.init(world, torch.device("cpu"))
    share = slice(world.rank * GLOBAL // world.size, (world.rank + 1) * GLOBAL // world.size)
    for backend, variant in combos:
        if variant == "clip":
            clipped(out, backend, share)
            continue
        if variant in PRECISION_VARIANTS:
            in_bf16(out, backend, variant, share)
            continue
        if variant == "cuda_autocast":
            cuda_autocast_inside_deepspeed(out, backend)
            continue
        model, batches, loss_fn = problem(variant)
        compile_blocks(model, variant in COMPILE_VARIANTS)
        full = sum(p.numel() for p in model.parameters())
        engine = build_engine(model, optimizer_for(variant), ParallelConfig(name=backend), CHUNK, torch.device("cpu"))
        if world.is_main:
            (out / f"{backend}-{variant}.numel").write_text(f"{local_numel(engine.module)} {full}")
        counter = SyncCounter(engine, backend) if variant == VARIANTS[0] else None
        per_step, losses = [], []
        for step, (images, labels) in enumerate(batches):
            before = counter.calls if counter else 0
            set_step(loss_fn, step)
            losses.append(two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, step).item())
            per_step.append(counter.calls - before if counter else 0)
        state = engine.full_state_dict()
        if world.is_main:
            (out / f"{backend}-{variant}.losses.json").write_text(json.dumps(losses))
        if variant in LOSS_VARIANTS + TOWER_VARIANTS + COMPILE_VARIANTS + ("layer_decay",):
            if world.is_main:
                torch.save(state, out / f"{backend}-{variant}.pt")
            distributed.barrier()
            continue
        if counter is not None and backend in ("ddp", "fsdp2"):
            units = syncs_of_one_backward(engine, batches[0][0][share][:CHUNK], counter)
            counter.close()
            if world.is_main:  # several chunks per rank, so a sync per chunk would show as a multiple
                (out / f"{backend}-syncs.json").write_text(json.dumps({"per_step": per_step, "units": units}))
        if world.is_main:
            torch.save(state, out / f"{backend}-{variant}.pt")
        folder = out / f"checkpoint-{backend}-{variant}"
        engine.save(folder)
        distributed.barrier()
        if world.is_main:  # what the export stage does: one process, any backend's checkpoint
            (folder / "meta.json").write_text(json.dumps({"format": engine.checkpoint_format}))
            exported, _, _ = problem(variant)
            checkpoint.load_weights(folder, exported)
            torch.save(exported.state_dict(), out / f"{backend}-{variant}-exported.pt")
        if variant in (VARIANTS[0], "lora"):
            model, _, _ = problem(variant)
            again = build_engine(model, optimizer_for(variant), ParallelConfig(name=backend), CHUNK, torch.device("cpu"))
            again.load(folder)
            state = again.full_state_dict()
            if world.is_main:
                torch.save(state, out / (f"{backend}-reloaded.pt" if variant == VARIANTS[0] else
                                         f"{backend}-{variant}-reloaded.pt"))
            if variant == VARIANTS[0]:
                weights_only(out, backend, folder, again, share)
        distributed.barrier()
    distributed.shutdown()


def weights_only(out: Path, backend: str, folder: Path, reloaded, share: slice) -> None:
    """Engine.load_weights (ReloadBest's road): a fresh engine steps away from the start, loads the
    checkpoint's weights alone, and takes one more step beside the fully reloaded engine `reloaded`
    (SGD has no state, so both steps must agree: under ZeRO the optimizer's fp32 partitions must
    follow the loaded weights, or the step would overwrite them)."""
    model, batches, loss_fn = problem(VARIANTS[0])
    fresh = build_engine(model, sgd, ParallelConfig(name=backend), CHUNK, torch.device("cpu"))
    images, labels = batches[0]
    two_pass_step(fresh, images[share], labels[share], loss_fn, CHUNK, SEED, 0)
    fresh.load_weights(folder)
    loaded = {k: v.clone() for k, v in fresh.full_state_dict().items()}  # DDP's are the live tensors
    for engine in (fresh, reloaded):
        two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, STEPS)
    stepped = [fresh.full_state_dict(), reloaded.full_state_dict()]
    if distributed.rank() == 0:
        torch.save({"loaded": loaded, "stepped": stepped[0], "reference": stepped[1]},
                   out / f"{backend}-weights-only.pt")


def clipped(out: Path, backend: str, share: slice) -> None:
    """The plain problem's steps with clipping at CLIP: weights and the norms before clipping."""
    model, batches, loss_fn = problem("plain")
    engine = build_engine(model, sgd, ParallelConfig(name=backend), CHUNK, torch.device("cpu"), grad_clip=CLIP)
    norms = []
    for step, (images, labels) in enumerate(batches):
        two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, step)
        norms.append(float(engine.grad_norm))
    state = engine.full_state_dict()
    if distributed.rank() == 0:
        torch.save(state, out / f"{backend}-clip.pt")
        (out / f"{backend}-clip-norms.json").write_text(json.dumps(norms))
    distributed.barrier()


def in_bf16(out: Path, backend: str, variant: str, share: slice) -> None:
    """The plain problem's steps under a bf16 forward: the weights after them, the dtype the first
    block's qkv weight has inside its forward (what the backend gathered), and a checkpoint."""
    model, batches, loss_fn = problem("plain")
    parallel = ParallelConfig(name=backend, param_dtype=PRECISION_VARIANTS[variant])
    engine = build_engine(model, sgd, parallel, CHUNK, torch.device("cpu"), precision="bf16")
    seen = []
    model.backbone.blocks[0].attn.qkv.register_forward_pre_hook(lambda m, _: seen.append(str(m.weight.dtype)))
    for step, (images, labels) in enumerate(batches):
        two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, step)
    state = engine.full_state_dict()
    folder = out / f"checkpoint-{backend}-{variant}"
    engine.save(folder)
    distributed.barrier()
    if distributed.rank() == 0:
        torch.save(state, out / f"{backend}-{variant}.pt")
        (out / f"{backend}-{variant}.dtypes.json").write_text(json.dumps(sorted(set(seen))))
        (folder / "meta.json").write_text(json.dumps({"format": engine.checkpoint_format}))
        exported, _, _ = problem("plain")
        checkpoint.load_weights(folder, exported)
        torch.save(exported.state_dict(), out / f"{backend}-{variant}-exported.pt")
    distributed.barrier()


@contextlib.contextmanager
def pretend_cuda(torch_autocast):
    """CUDA autocast switchable without a GPU (torch otherwise disables it with a warning), and
    DeepSpeed's accelerator saying cuda."""
    saved = [(torch_autocast, "get_accelerator"), (torch.cuda.amp.common, "amp_definitely_not_available"),
             (torch.cuda, "is_bf16_supported")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved]
    torch_autocast.get_accelerator = lambda: type("Cuda", (), {"device_name": lambda self: "cuda"})()
    torch.cuda.amp.common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def cuda_autocast_inside_deepspeed(out: Path, backend: str) -> None:
    """Whether CUDA bf16 autocast, on outside, is still on inside the DeepSpeed engine's forward, with
    DeepSpeed's accelerator stubbed to say cuda (its `autocast_if_enabled` asks it for the device
    type): under the config the engine builds for a CUDA device (fp32 weights: CPU tensors in bf16 mode
    would need a CPU autocast), and under the same config without its `torch_autocast` section (the
    repository's JSON as it was)."""
    from deepspeed.runtime import torch_autocast

    config = deepspeed_config(ParallelConfig(name=backend, param_dtype="fp32"), CHUNK, torch.device("cuda", 0))
    plain = {k: v for k, v in config.items() if k != "torch_autocast"}
    inside = {}
    for name, cfg in (("generated", config), ("without_sections", plain)):
        model, batches, _ = problem("plain")
        engine = DeepSpeedEngine(model, *sgd(model), torch.device("cpu"), cfg, precision="bf16")
        seen = []
        model.register_forward_pre_hook(lambda m, _: seen.append(torch.is_autocast_enabled("cuda")))
        with pretend_cuda(torch_autocast), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            engine.model(batches[0][0][:CHUNK])  # CUDA autocast on: the CPU tensors are unaffected by it
        inside[name] = seen
    if distributed.rank() == 0:
        (out / f"{backend}-cuda_autocast.json").write_text(json.dumps({"config": config, "inside": inside}))
    distributed.barrier()


if __name__ == "__main__":
    extra = [tuple(c.split(":")) for c in sys.argv[4].split(",")] if len(sys.argv) > 4 else []
    main(Path(sys.argv[1]), [(b, v) for b in sys.argv[2].split(",") for v in sys.argv[3].split(",") if v] + extra)
