"""Time a few training steps of the demo's tiny ViT with N torch threads, as the demo runs them on a
machine that may be busy (issue 22): OMP_WAIT_POLICY decides whether waiting OpenMP threads spin or
sleep, and is read when torch loads, so set it in the environment of this command.

    OMP_WAIT_POLICY=ACTIVE python tools/bench_threads.py --threads 2    # OpenMP's default: spin
    python tools/bench_threads.py --threads 2                           # the pipeline's default: PASSIVE
"""
from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import torch

    from pipeline.config import load_config
    from pipeline.models.encoders import build_encoder

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_encoder(load_config([]).model, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model(images).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"{args.threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}: {args.steps} steps in "
          f"{time.perf_counter() - start:.1f} s, loss {loss.item()!r}, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
