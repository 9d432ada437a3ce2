"""Two two-pass steps under each backend, on this rank's share of the global batch; rank 0 saves the
weights after them, for tests/test_parallel.py to compare with one process doing one-pass steps,
the weights of a fresh engine that loaded the engine's checkpoint, and those the export stage
consolidates from it.

    torchrun --nproc_per_node 2 tests/parallel_worker.py OUT_DIR ddp,zero1,... plain,frozen_ckpt
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline import checkpoint, distributed  # noqa: E402
from pipeline.config import ModelConfig, ParallelConfig  # noqa: E402
from pipeline.distributed import world_from_env  # noqa: E402
from pipeline.encoders import build_encoder  # noqa: E402
from pipeline.engine import build_engine  # noqa: E402
from pipeline.losses import RecallAtK  # noqa: E402
from pipeline.two_pass import two_pass_step  # noqa: E402

GLOBAL, CHUNK, SEED, STEPS, LR = 16, 4, 5, 2, 0.5
VARIANTS = ("plain", "frozen_ckpt")


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
    return model, batches, RecallAtK(ks=(1, 2, 4), tau_rank=0.05)


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


def main(out: Path, backends: list[str], variants: list[str]) -> None:
    world = world_from_env()
    distributed.init(world, torch.device("cpu"))
    share = slice(world.rank * GLOBAL // world.size, (world.rank + 1) * GLOBAL // world.size)
    for backend in backends:
        for variant in variants:
            model, batches, loss_fn = problem(variant)
            full = sum(p.numel() for p in model.parameters())
            engine = build_engine(model, sgd, ParallelConfig(name=backend), CHUNK, torch.device("cpu"))
            if world.is_main:
                (out / f"{backend}-{variant}.numel").write_text(f"{local_numel(engine.module)} {full}")
            for step, (images, labels) in enumerate(batches):
                two_pass_step(engine, images[share], labels[share], loss_fn, CHUNK, SEED, step)
            state = engine.full_state_dict()
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


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(","))
