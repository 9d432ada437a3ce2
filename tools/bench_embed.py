"""Embed throughput: `pipeline.eval.inference.embed_split` end to end against its two parts, in one run.

On a synthetic split of JPEG shards, times
  forward:  the model alone on tensors already in memory (batches of --batch);
  decode:   decoding + the eval transform alone, in this process;
  embed:    `embed_split` (webdataset stream, --workers DataLoader workers decoding, forward, merge),
and prints images/s, embed's ratio to the forward alone (forward and embed are timed in turn,
--repeats rounds; the median of the rounds' ratios), and the best embed against both parts run
one after the other (1 / (1/forward + 1/decode)): above 1 when the workers decode while the model runs.

  bash tools/env.sh python tools/bench_embed.py --images 1024 --workers 1
  (trailing key=value: model settings as for pipeline/run.py, e.g. model=dinov2_vitl14 model.depth=2)
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_loader import synthetic  # tools/ is on sys.path when run as a script
from PIL import Image

from pipeline.config import load_config
from pipeline.data.converters import Record
from pipeline.data.shards import ShardIndex, write_split
from pipeline.data.transforms import eval_transform
from pipeline.eval.inference import embed_split
from pipeline.models.encoders import build_encoder


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=64, help="stored image side")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="model=... model.key=value")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.overrides).model
    model = build_encoder(cfg, seed=0).eval()
    transform = eval_transform(cfg)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "test"
        records = (Record(f"s{i:06d}", i % 10, synthetic(i, args.size), {}) for i in range(args.images))
        write_split(records, folder, "test", args.size, "jpg", max_count=256, max_size=1 << 30)
        index = ShardIndex.load(folder)

        blobs = []
        for shard, offset, size in index.locations:
            with open(folder / index.shards[shard], "rb") as f:
                f.seek(offset)
                blobs.append(f.read(size))
        tic = time.perf_counter()
        tensors = [transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
        decode = len(blobs) / (time.perf_counter() - tic)

        batches = [torch.stack(tensors[i:i + args.batch]) for i in range(0, len(tensors), args.batch)]
        with torch.no_grad():
            model(batches[0])  # warm-up
        forwards, embeds = [], []
        for _ in range(args.repeats):  # alternated, so that load from other jobs hits both alike
            tic = time.perf_counter()
            with torch.no_grad():
                for batch in batches:
                    model(batch)
            forwards.append(len(tensors) / (time.perf_counter() - tic))
            tic = time.perf_counter()
            out = embed_split(model, folder, transform, args.batch, device, workers=args.workers)
            embeds.append(len(out["keys"]) / (time.perf_counter() - tic))
    forward, embed = max(forwards), max(embeds)
    ratio = float(np.median(np.array(embeds) / np.array(forwards)))
    serial = 1 / (1 / forward + 1 / decode)
    print(f"model {cfg.name} ({cfg.family} {cfg.arch}, {cfg.image_size}px, depth {cfg.depth}), images {args.images}, "
          f"batch {args.batch}, workers {args.workers}, torch threads 1")
    print(f"forward alone:        {forward:8.1f} images/s (best of {args.repeats})")
    print(f"decode+transform:     {decode:8.1f} images/s")
    print(f"embed_split:          {embed:8.1f} images/s (best of {args.repeats})")
    print(f"ratio embed/forward:  {ratio:8.3f} (median of the rounds; best embed / both parts in series: "
          f"{embed / serial:.3f})")


if __name__ == "__main__":
    main()
