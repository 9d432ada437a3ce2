"""The loss split across ranks: its cost per rank with 1 and 2 processes, and its share of a training step.

For each N in --processes, torchrun starts N CPU processes (gloo, OMP_NUM_THREADS=1 each: N processes
on N cores) and every rank measures, the cases alternated round by round:

1. the loss phase of the two-pass step, `share_loss_and_grad` (gather the embeddings, this rank's part
   of the loss and its backward, reduce-scatter of the gradients, all-reduce of the loss), at global
   batch --batch (4,000), D = 512, 4 per class, for RS@k and RS@k + SiMix (every within-class pair),
   split across the ranks (train.split_loss=true) and whole on every rank (false, as before);
2. one two-pass step (`two_pass_step`, ddp under several processes, split RS@k) of the Quick start's
   model (model=tiny: ViT, 32 px, patch 8, 4 blocks) on random images at the same global batch, so
   the loss's share of a step is (1) / (2).

The slowest rank's median over the rounds is reported (wall and CPU seconds).

    bash tools/env.sh python tools/bench_loss_scaling.py [--processes 1,2] [--batch 4000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
from bench_recall_at_k import KS, inputs  # noqa: E402  (tools/ is on sys.path when run as a script)

from pipeline.parallel import distributed  # noqa: E402
from pipeline.losses import RecallAtK, RecallAtKSiMix, set_step  # noqa: E402
from pipeline.train.two_pass import share_loss_and_grad, two_pass_step  # noqa: E402


def slowest(seconds: tuple[float, float]) -> tuple[float, float]:
    """The largest (wall, cpu) over the ranks."""
    box = torch.tensor(seconds, dtype=torch.float64)
    if distributed.initialized():
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MAX)
    return tuple(box.tolist())


def timed(fn) -> tuple[float, float]:
    distributed.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return slowest((time.perf_counter() - wall, time.process_time() - cpu))


def loss_cases(batch: int, dim: int) -> dict:
    emb, labels = inputs(batch, dim, 4)
    share = slice(distributed.rank() * batch // distributed.world_size(),
                  (distributed.rank() + 1) * batch // distributed.world_size())
    cases = {}
    for split in (True, False):
        rsk = RecallAtK(KS, split_across_ranks=split)
        simix = RecallAtKSiMix(KS, split_across_ranks=split)
        set_step(simix, 0)
        for name, loss_fn in (("rsk", rsk), ("rsk_simix", simix)):
            cases[f"{name}, {'split' if split else 'whole'}"] = (
                lambda f=loss_fn: share_loss_and_grad(emb[share], labels[share], f))
    return cases


def step_case(batch: int, chunk: int):
    from pipeline.config import TrainConfig, load_config
    from pipeline.parallel.engine import build_engine
    from pipeline.models.encoders import build_encoder
    from pipeline.train.optim import build_optimizer

    cfg = load_config(["model=tiny", f"parallel={'ddp' if distributed.world_size() > 1 else 'none'}"])
    model = build_encoder(cfg.model, seed=0).train()
    engine = build_engine(model, lambda m: build_optimizer(m, TrainConfig(max_steps=10, warmup_steps=0)),
                          cfg.parallel, chunk, torch.device("cpu"))
    share = batch // distributed.world_size()
    gen = torch.Generator().manual_seed(distributed.rank())
    images = torch.randn(share, 3, cfg.model.image_size, cfg.model.image_size, generator=gen)
    labels = torch.arange(batch // 4).repeat_interleave(4)[distributed.rank() * share:(distributed.rank() + 1) * share]
    loss_fn = RecallAtK(KS)
    return lambda: two_pass_step(engine, images, labels, loss_fn, chunk, 0, 0)


def worker(args) -> None:
    distributed.init(distributed.world_from_env(), torch.device("cpu"))
    cases = loss_cases(args.batch, args.dim)
    for fn in cases.values():  # warm-up (first calls pay one-off set-up costs)
        fn()
    results = {name: [] for name in cases}
    for r in range(args.rounds):
        for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            results[name].append(timed(cases[name]))
    if args.step_rounds:
        step = step_case(args.batch, args.chunk)
        results["two-pass step, tiny ViT"] = [timed(step) for _ in range(args.step_rounds)]
    if distributed.rank() == 0:
        summary = {name: [statistics.median(t[i] for t in times) for i in (0, 1)] for name, times in results.items()}
        print(json.dumps({"processes": distributed.world_size(), "seconds": summary}), flush=True)
    distributed.shutdown()


def launch(args, processes: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__,
           "--worker", "--batch", str(args.batch), "--dim", str(args.dim), "--rounds", str(args.rounds),
           "--chunk", str(args.chunk), "--step-rounds", str(args.step_rounds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"{processes} processes failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--batch", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--step-rounds", type=int, default=1, help="two-pass steps timed (0: none)")
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"torch {torch.__version__}, B={args.batch}, D={args.dim}, 1 thread per process, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    runs = [launch(args, int(n)) for n in args.processes.split(",")]
    names = list(runs[0]["seconds"])
    print("| case | " + " | ".join(f"{r['processes']} process(es), slowest rank: wall / CPU s" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        print(f"| {name} | " + " | ".join("{:.2f} / {:.2f}".format(*r["seconds"][name]) for r in runs) + " |")
    step = "two-pass step, tiny ViT"
    if step in names:
        for r in runs:
            share = r["seconds"]["rsk, split"][0] / r["seconds"][step][0]
            print(f"{r['processes']} process(es): the split RS@k loss is {share:.1%} of the two-pass step (wall)")


if __name__ == "__main__":
    main()
