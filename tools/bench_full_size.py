"""Benchmark: one two-pass step of a large preset at its real size (random weights), on the CPU or a GPU.

    python tools/bench_full_size.py --preset vitl14_clip                        # one process, parallel=none
    python -m torch.distributed.run --standalone --nproc_per_node 2 tools/bench_full_size.py \
        --preset vitg14_clip --parallel fsdp2                                   # 2 processes, sharded

Prints one JSON line (rank 0): the build time, the step's wall time and seconds per image, the peak
resident memory of this process (getrusage ru_maxrss; on a GPU also torch.cuda.max_memory_allocated),
and the step's achieved FLOP/s against this machine's own matmul FLOP/s, measured in the same
process with the same threads (a square fp32 matmul on the CPU; bf16 on a GPU): the CPU's model
FLOP utilisation. Model FLOPs are one forward and one backward per image (pipeline/models/accounting.py);
the step executes about 5/3 of them with activation checkpointing (pass 1's forward, pass 2's
forward, the recomputed forward and the backward), 4/3 without: both fractions are printed.
`--steps N` times N steps (the figure: the mean of all but the first). `--mmap-threshold 0` leaves glibc's
own mmap threshold (pipeline/parallel/host_memory.py otherwise fixes it on the CPU at 1 MiB): the arms
of that setting's cost in BENCHMARKS.md.
Global batch `--batch` images of `--batch // 2` classes, chunk `--chunk`, SGD (no optimizer state:
the step's memory is weights, gradients and one chunk's activations).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from pipeline.parallel import distributed  # noqa: E402
from pipeline.config import ParallelConfig, load_config  # noqa: E402
from pipeline.parallel.distributed import pick_device, world_from_env  # noqa: E402
from pipeline.parallel import host_memory  # noqa: E402
from pipeline.parallel.engine import build_engine  # noqa: E402
from pipeline.losses import RecallAtK  # noqa: E402
from pipeline.models import accounting  # noqa: E402
from pipeline.models.encoders import build_encoder  # noqa: E402
from pipeline.train.two_pass import two_pass_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vitl14_clip")
    parser.add_argument("--parallel", default="none")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-grad-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--mmap-threshold", type=int, default=host_memory.THRESHOLD,
                        help="bytes; 0 = glibc's own rule (pipeline/parallel/host_memory.py)")
    args = parser.parse_args()
    host_memory.THRESHOLD = args.mmap_threshold  # build_engine applies it (fsdp2, zero3 on the CPU)

    world = world_from_env()
    device = pick_device(args.device, world)
    distributed.init(world, device)
    checkpointing = not args.no_grad_checkpointing
    cfg = load_config([f"model={args.preset}", f"model.grad_checkpointing={str(checkpointing).lower()}"]).model
    forward_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    machine = accounting.matmul_flops(device, torch.bfloat16 if forward_bf16 else torch.float32)

    tic = time.perf_counter()
    model = build_encoder(cfg, seed=0).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())

    def sgd(m):
        optimizer = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)

    engine = build_engine(model, sgd, ParallelConfig(name=args.parallel), args.chunk, device, precision=args.precision)
    built = time.perf_counter() - tic

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=gen)
    labels = torch.arange(args.batch // 2).repeat_interleave(2)
    share = slice(world.rank * args.batch // world.size, (world.rank + 1) * args.batch // world.size)
    loss_fn = RecallAtK(ks=(1, 2), tau_rank=0.05)
    times = []
    for i in range(args.steps):
        distributed.barrier()
        tic = time.perf_counter()
        loss = two_pass_step(engine, images[share].to(device), labels[share].to(device), loss_fn, args.chunk, 0, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tic)
    step = sum(times[1:]) / (len(times) - 1) if len(times) > 1 else times[0]

    model_flops = accounting.flops_per_image(cfg, args.chunk) * args.batch
    executed = accounting.two_pass_flops(cfg, args.chunk, args.batch)
    per_process = executed / world.size / step
    result = {
        "preset": args.preset, "arch": cfg.arch, "parallel": args.parallel, "processes": world.size,
        "device": str(device), "precision": args.precision, "mmap_threshold": args.mmap_threshold, "steps": args.steps, "grad_checkpointing": checkpointing,
        "parameters": parameters, "batch": args.batch, "chunk": args.chunk, "loss": float(loss),
        "build_s": round(built, 1), "step_s": round(step, 3), "s_per_image": round(step / args.batch, 4),
        "peak_rss_gb": round(accounting.peak_memory_gb(torch.device("cpu")), 2),
        "model_tflop": round(model_flops / 1e12, 3), "executed_tflop": round(executed / 1e12, 3),
        "achieved_gflops_per_process": round(per_process / 1e9, 1),
        "machine_matmul_gflops_per_process": round(machine / 1e9, 1),
        "mfu_of_machine_matmul": round(per_process / machine, 3),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    if world.is_main:
        print(json.dumps(result), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
