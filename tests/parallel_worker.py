"""Two two-pass steps under each backend, on this rank's share of the global batch; rank 0 saves the
weights after them, for tests/test_parallel.py to compare with one process doing one-pass steps,
the weights of a fresh engine that loaded the engine's checkpoint, and those the export stage
consolidates from it. Variant `clip`: the plain problem with train.grad_clip=CLIP, whose global
gradient norms (before clipping) it saves too. The loss variants (LOSS_VARIANTS) save their weights
and losses only.

    torchrun --nproc_per_node 2 tests/parallel_worker.py OUT_DIR ddp,zero1,... plain,frozen_ckpt,clip [ddp:simix,...]
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import ModelConfig, ParallelConfig  # noqa: E402
from pipeline.dist import (
    checkpoint,
    distributed,  # noqa: E402
)
from pipeline.dist.distributed import world_from_env  # noqa: E402
from pipeline.dist.engine import build_engine  # noqa: E402
from pipeline.losses import RecallAtK, RecallAtKSiMix, set_step  # noqa: E402
from pipeline.models.encoders import build_encoder  # noqa: E402
from pipeline.train.two_pass import two_pass_step  # noqa: E402

GLOBAL, CHUNK, SEED, STEPS, LR = 16, 4, 5, 2, 0.5
VARIANTS = ("plain", "frozen_ckpt")
CLIP = 1.0  # below both steps' gradient norms (about 8.8 and 1.6): every step is clipped
# The plain model with another loss: RS@k + SiMix split across the ranks (virtual queries shared out
# too), and RS@k computed whole on every rank (the path of every loss that does not split).
LOSS_VARIANTS = ("simix", "whole_loss")


def make_loss(variant: str):
    if variant == "simix":
        return RecallAtKSiMix(ks=(1, 2, 4), tau_rank=0.05, seed=SEED)
    return RecallAtK(ks=(1, 2, 4), tau_rank=0.05, split_across_ranks=variant != "whole_loss")


def problem(variant: str):
    """The model (drop-path on), the batches of each step, the loss. `frozen_ckpt`: the patch
    embedding and the first block frozen, activation checkpointing on."""
    frozen_ckpt = variant == "frozen_ckpt"
    cfg = ModelConfig(patch_size=8, depth=2, embed_dim=24, drop_path=0.2, grad_checkpointing=frozen_ckpt)
    model = build_encoder(cfg, seed=0).train()
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
        model, batches, loss_fn = problem(variant)
        full = sum(p.numel() for p in model.parameters())
        engine = build_engine(model, sgd, ParallelConfig(name=backend), CHUNK, torch.device("cpu"))
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
        if variant in LOSS_VARIANTS:
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
        if variant == VARIANTS[0]:
            model, _, _ = problem(variant)
            again = build_engine(model, sgd, ParallelConfig(name=backend), CHUNK, torch.device("cpu"))
            again.load(folder)
            state = again.full_state_dict()
            if world.is_main:
                torch.save(state, out / f"{backend}-reloaded.pt")
        distributed.barrier()
    distributed.shutdown()


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


if __name__ == "__main__":
    extra = [tuple(c.split(":")) for c in sys.argv[4].split(",")] if len(sys.argv) > 4 else []
    main(Path(sys.argv[1]), [(b, v) for b in sys.argv[2].split(",") for v in sys.argv[3].split(",") if v] + extra)
