"""Benchmark: the two-pass step against the naive one-pass step.

    bash tools/env.sh python tools/bench_two_pass.py                       # tiny ViT on the CPU
    python tools/bench_two_pass.py --model vitl14_clip --device cuda --grad-checkpointing \
        --batches 256,1024,4096,8192,16384 --chunk 256 --one-pass-max 4096 --time-batch 512
                                                    # open_clip ViT-L/14, 224 px, bf16 autocast, GPU

1. Peak memory against the global batch (same chunk): each (step, batch) runs one training step in a
   fresh subprocess, which reports its peak memory (CPU: resident memory, getrusage ru_maxrss; GPU:
   torch.cuda.max_memory_allocated) and its memory just before the step (model, optimizer and the batch's images already built), so no run
   inherits another's high-water mark or allocator caches. Two-pass memory should stay within 1.15x
   of its value at the smallest batch; one-pass memory grows with the batch (it keeps every chunk's
   activations), so it is measured only up to --one-pass-max. A batch that runs out of memory ends
   that mode's list: the last batch printed is the largest that fits.
2. Step time, two-pass / one-pass, at one batch where both fit, without activation checkpointing:
   the same process alternates the two steps and takes the median of --repeats each. The bound is
   4/3 (one extra forward) plus the loss and gather overheads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def model_config(args):
    """--model PRESET (e.g. vitl14_clip, random init), or the tiny timm ViT shaped by the flags."""
    from pipeline.config import ModelConfig, load_config

    if args.model:
        return load_config([f"model={args.model}", f"model.grad_checkpointing={args.grad_checkpointing}"]).model
    return ModelConfig(image_size=args.image_size, patch_size=args.patch, depth=args.depth, drop_path=0.1,
                       grad_checkpointing=args.grad_checkpointing)


def setup(args, batch: int):
    import torch

    from pipeline.config import TrainConfig
    from pipeline.parallel.distributed import World, pick_device
    from pipeline.parallel.engine import Engine
    from pipeline.losses import RecallAtK
    from pipeline.models.encoders import build_encoder
    from pipeline.train.optim import build_optimizer

    torch.set_num_threads(args.threads)
    device = pick_device(args.device, World())
    cfg = model_config(args)
    model = build_encoder(cfg, seed=0).to(device).train()
    engine = Engine(model, *build_optimizer(model, TrainConfig(max_steps=100, warmup_steps=0)), device)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    labels = torch.arange(batch // 4).repeat_interleave(4).to(device)  # P x K with K = 4
    return engine, images, labels, RecallAtK()


def memory_mb(device) -> tuple[float, float]:
    """(now, peak since the last reset): GPU allocations on CUDA, resident memory on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb(), peak_rss_mb()


def step_fn(mode: str):
    from pipeline.train.two_pass import one_pass_step, two_pass_step

    return {"two_pass": two_pass_step, "one_pass": one_pass_step}[mode]


def measure(args) -> None:
    """In a fresh process: one step; prints its memory as JSON."""
    import torch

    engine, images, labels, loss_fn = setup(args, args.batch)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(engine.device)
    before, _ = memory_mb(engine.device)
    tic = time.perf_counter()
    try:
        step_fn(args.measure)(engine, images, labels, loss_fn, args.chunk, 0, 0)
    except torch.OutOfMemoryError:
        print(json.dumps({"oom": True}))
        return
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"before_mb": before, "peak_mb": memory_mb(engine.device)[1], "seconds": time.perf_counter() - tic}))


def memory_table(args) -> list[dict]:
    rows = []
    for mode, batches in (("two_pass", args.batches), ("one_pass", [b for b in args.batches if b <= args.one_pass_max])):
        for batch in batches:
            cmd = [sys.executable, __file__, "--measure", mode, "--batch", str(batch), *forwarded(args)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            row = {"mode": mode, "batch": batch, **json.loads(out.stdout.strip().splitlines()[-1])}
            if row.get("oom"):
                print(f"  {mode:8s} batch {batch:5d}: out of memory", flush=True)
                break
            rows.append(row)
            print(f"  {mode:8s} batch {batch:5d}: peak {row['peak_mb']:7.0f} MB (before the step {row['before_mb']:6.0f} MB)"
                  f"  {row['seconds']:6.1f} s", flush=True)
    return rows


def forwarded(args) -> list[str]:
    return ["--chunk", str(args.chunk), "--image-size", str(args.image_size), "--patch", str(args.patch),
            "--depth", str(args.depth), "--threads", str(args.threads), "--device", args.device,
            *(["--model", args.model] if args.model else []), *(["--grad-checkpointing"] if args.grad_checkpointing else [])]


def time_ratio(args) -> tuple[float, float]:
    engine, images, labels, loss_fn = setup(args, args.time_batch)
    times = {"two_pass": [], "one_pass": []}
    for step in range(args.repeats + 1):
        for mode in times:
            tic = time.perf_counter()
            step_fn(mode)(engine, images, labels, loss_fn, args.chunk, 0, step)
            if step:  # the first round warms up
                times[mode].append(time.perf_counter() - tic)
    return statistics.median(times["two_pass"]), statistics.median(times["one_pass"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--one-pass-max", type=int, default=1024, help="largest batch for the one-pass step (RAM)")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="a model preset (e.g. vitl14_clip) instead of the tiny ViT")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing in the encoder")
    p.add_argument("--time-batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--measure", choices=["two_pass", "one_pass"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args)

    import torch

    gpu = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {args.threads} threads")
    cfg = model_config(args)
    print(f"model: {cfg.name} ({cfg.family} {cfg.arch}), {cfg.image_size} px, activation checkpointing "
          f"{cfg.grad_checkpointing}; RS@k; chunk {args.chunk}; device {args.device}")
    rows = memory_table(args)
    two = {r["batch"]: r["peak_mb"] for r in rows if r["mode"] == "two_pass"}
    one = {r["batch"]: r["peak_mb"] for r in rows if r["mode"] == "one_pass"}
    first = min(two)
    print(f"peak memory, two-pass: largest / batch {first} = {max(two.values()) / two[first]:.3f}x  (limit 1.15x)")
    for batch in sorted(two):
        extra = f"   one-pass {one[batch]:.0f} MB ({one[batch] / two[batch]:.2f}x two-pass)" if batch in one else ""
        print(f"  batch {batch:5d}: two-pass {two[batch]:.0f} MB ({two[batch] / two[first]:.3f}x){extra}")
    two_s, one_s = time_ratio(args)
    print(f"step time at batch {args.time_batch}, chunk {args.chunk}, activation checkpointing {cfg.grad_checkpointing}: "
          f"two-pass {two_s:.2f} s, one-pass {one_s:.2f} s, ratio {two_s / one_s:.3f}  (limit 1.4)")


if __name__ == "__main__":
    main()
