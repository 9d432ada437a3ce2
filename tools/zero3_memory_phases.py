"""Where a ZeRO-3 rank's host memory goes, phase by phase, in the full-size step's setting (fp32, SGD,
global batch 4 = 2 classes x 2, chunk 1, grad checkpointing as the preset says, `ds_configs/zero3.json`).

    torchrun --standalone --nproc_per_node 2 tools/zero3_memory_phases.py dinov2_vitl14 [--mmap-threshold BYTES]

Prints one JSON line per rank and phase: the resident memory at the phase's end, its peak within the
phase (VmHWM, reset at each phase's start), and the parameter elements still gathered (ZeRO-3's
AVAILABLE status: a leak of gathered weights would show here). `--mmap-threshold 0` leaves glibc's own
rule, which `pipeline/parallel/host_memory.py` otherwise replaces by a fixed threshold: BENCHMARKS.md's rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.config import ParallelConfig, load_config  # noqa: E402
from pipeline.parallel import distributed, host_memory  # noqa: E402
from pipeline.parallel.engine import build_engine  # noqa: E402
from pipeline.losses import RecallAtK  # noqa: E402
from pipeline.models import accounting  # noqa: E402
from pipeline.models.encoders import build_encoder  # noqa: E402
from pipeline.train import two_pass  # noqa: E402

GLOBAL, CHUNK, SEED = 4, 1, 3
CPU = torch.device("cpu")


def gathered_elements(module: torch.nn.Module | None) -> int:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if module is None:
        return 0
    return sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE)


def report(phase: str, module: torch.nn.Module | None = None) -> None:
    print(json.dumps({"rank": distributed.rank(), "phase": phase,
                      "rss_gb": round(psutil.Process().memory_info().rss / 1e9, 2),
                      "peak_in_phase_gb": round(accounting.peak_memory_gb(CPU), 2),
                      "gathered_elements": gathered_elements(module)}), flush=True)
    accounting.reset_peak_memory(CPU)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("--parallel", default="zero3")
    parser.add_argument("--mmap-threshold", type=int, default=host_memory.THRESHOLD,
                        help="bytes; 0 = glibc's own rule (pipeline/parallel/host_memory.py)")
    args = parser.parse_args()
    host_memory.THRESHOLD = args.mmap_threshold  # build_engine applies it (fsdp2, zero3 on the CPU)
    world = distributed.world_from_env()
    distributed.init(world, CPU)
    cfg = load_config([f"model={args.preset}"]).model
    gen = torch.Generator().manual_seed(SEED)
    images = torch.randn(GLOBAL, 3, cfg.image_size, cfg.image_size, generator=gen)
    labels = torch.arange(GLOBAL // 2).repeat_interleave(2)
    share = slice(world.rank * GLOBAL // world.size, (world.rank + 1) * GLOBAL // world.size)
    images, labels = images[share], labels[share]
    report("started")
    model = build_encoder(cfg, seed=0).train()
    report("built")

    def sgd(m):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)

    engine = build_engine(model, sgd, ParallelConfig(name=args.parallel), CHUNK, CPU, precision="fp32")
    report("deepspeed.initialize", engine.module)
    seeds = [two_pass.chunk_seed(SEED, 0, len(images) * world.rank + p.start) for p in two_pass.chunks(len(images), CHUNK)]
    embeddings = two_pass.embed_without_grad(engine, images, CHUNK, seeds)
    report("pass 1", engine.module)
    _, grad = two_pass.share_loss_and_grad(embeddings, labels, RecallAtK(ks=(1, 2), tau_rank=0.05))
    report("loss", engine.module)
    two_pass.backward_in_chunks(engine, images, grad, CHUNK, seeds)
    report("pass 2", engine.module)
    engine.step()
    report("optimizer step", engine.module)
    distributed.shutdown()


if __name__ == "__main__":
    main()
