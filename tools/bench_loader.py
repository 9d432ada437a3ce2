"""Training-loader throughput against the decode + augment limit, measured in one run.

Writes a synthetic split of JPEGs (natural-looking smooth images with noise) into shards, then times
  limit:  `workers` processes decoding and augmenting the same JPEG bytes, held in memory, with
          nothing else (no index, no sampler, no DataLoader, no batching, no IPC of tensors);
  loader: `pipeline.data.loader.train_loader` with `workers` DataLoader workers (index reads from
          the shards, P x K sampler, per-sample seeding, collation, transfer to the main process).
and prints both in images/s and their ratio. The two are measured in turn, --repeats times; each
round's ratio compares two measurements taken a few seconds apart (the machine may be shared), and
the median of the rounds is the headline figure.

  bash tools/env.sh python tools/bench_loader.py --images 2048 --workers 2
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import DataConfig, ModelConfig
from pipeline.data.converters import Record
from pipeline.data.loader import train_loader
from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex, write_split
from pipeline.data.transforms import train_transform


def synthetic(i: int, size: int) -> Image.Image:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + c) * np.cos(4 * y * rng.uniform(0.5, 2)) for c in range(3)], -1)
    pixels = (127 + 100 * base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _decode_augment(args) -> int:
    blobs, data, model = args
    torch.set_num_threads(1)
    transform = train_transform(data, model)
    for blob in blobs:
        transform(Image.open(io.BytesIO(blob)).convert("RGB"))
    return len(blobs)


def _loader_rate(index, data, model, sampler, steps, workers) -> float:
    """images/s of the training loader over steps+1..2*steps, after one warm-up step (worker start-up)."""
    loader = iter(train_loader(index, train_transform(data, model), sampler, steps, 2 * steps + 1, workers=workers))
    next(loader)
    tic = time.perf_counter()
    n = sum(len(images) for images, _ in loader)
    return n / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--classes", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="stored image side (shorter side)")
    p.add_argument("--crop", type=int, default=224, help="model input side")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    data, model = DataConfig(crop_scale=[0.2, 1.0], hflip=True), ModelConfig(image_size=args.crop)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        records = (Record(f"s{i:06d}", i % args.classes, synthetic(i, args.size), {}) for i in range(args.images))
        write_split(records, folder, "train", args.size, "jpg", max_count=512, max_size=1 << 30, workers=args.workers)
        index = ShardIndex.load(folder)
        steps = args.images // args.batch
        sampler = PKSampler(index.labels, args.batch, 4, seed=0)
        seen = np.concatenate([sampler.batch(s) for s in range(steps + 1, 2 * steps + 1)])  # the timed steps
        blobs = []
        for i in seen:  # the same samples, as bytes in memory
            shard, offset, size = index.locations[i]
            with open(folder / index.shards[shard], "rb") as f:
                f.seek(offset)
                blobs.append(f.read(size))

        chunks = [(blobs[w::args.workers], data, model) for w in range(args.workers)]
        limits, rates = [], []
        with mp.get_context("fork").Pool(args.workers) as pool:
            pool.map(_decode_augment, [(c[0][:4], data, model) for c in chunks])  # warm the workers
            for _ in range(args.repeats):  # alternated, so that load from other jobs hits both alike
                tic = time.perf_counter()
                n = sum(pool.map(_decode_augment, chunks))
                limits.append(n / (time.perf_counter() - tic))
                rates.append(_loader_rate(index, data, model, sampler, steps, args.workers))
    print(f"images {len(seen)}  batch {args.batch}  workers {args.workers}  stored {args.size}px jpg -> crop {args.crop}px")
    print("round ratios loader/limit: " + " ".join(f"{r / lim:.3f}" for r, lim in zip(rates, limits)))
    print(f"decode+augment limit: {max(limits):8.1f} images/s (best of {args.repeats})")
    print(f"train_loader:         {max(rates):8.1f} images/s (best of {args.repeats})")
    print(f"ratio loader/limit:   {np.median(np.array(rates) / np.array(limits)):8.3f} (median of the rounds; "
          f"best/best {max(rates) / max(limits):.3f})")


if __name__ == "__main__":
    main()
