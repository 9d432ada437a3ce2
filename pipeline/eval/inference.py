"""Embed a whole split with a model in eval mode, across every process of the group, and store/load
embeddings as .npz.

`embed_split` is called on every rank. The split's shards are dealt out in order (rank r takes
shards r, r + W, ...; within a rank, DataLoader workers take turns through `wds.split_by_worker`),
each rank embeds its own, and the results are merged in shard order on every rank. Every rank runs
the same number of forward passes (the largest share, known in advance from the index; the short
ranks pad with blank batches whose outputs are dropped), so a model whose forward communicates
(FSDP, ZeRO-3) never leaves a rank waiting. With `parts`, each finished shard's embeddings are
saved there and a rerun (after a crash, say) skips the shards already saved; `parts` must be
on a filesystem every rank sees (as the run directory is on a cluster).
"""
from __future__ import annotations

import io
import math
import os
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch import nn

from pipeline.data.shards import ShardIndex
from pipeline.parallel import distributed
from pipeline.parallel.distributed import broadcast_object
from pipeline.parallel.precision import autocast
from pipeline.progress import progress


def _by_rank(shards: list[int], rank: int, world: int) -> list[int]:
    """wds.split_by_node's rule (every world-th shard from rank), applied here rather than inside the
    pipeline because every rank must know every rank's share in advance (equal forward passes), and
    the shards left to do depend on the saved parts. It also takes the rank from the process group,
    where wds would prefer $RANK."""
    return list(islice(shards, rank, None, world))


def _stream(index: ShardIndex, shards: list[int], transform: Callable, batch_size: int, workers: int):
    """Batches of (images, keys) from `shards`, decoded and transformed in DataLoader workers."""
    urls = [str(index.folder / index.shards[s]) for s in shards]
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=lambda src: src,
                              workersplitter=wds.split_by_worker)
               .to_tuple("__key__", "png;jpg;webp")  # only the image is decoded, not cls/json
               .map_tuple(str, lambda data: transform(Image.open(io.BytesIO(data)).convert("RGB")))
               .batched(batch_size, collation_fn=lambda rows: (torch.stack([r[1] for r in rows]), [r[0] for r in rows])))
    return wds.WebLoader(dataset, batch_size=None, num_workers=min(workers, len(urls)))


def _exact_batches(loader, size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Re-cut the workers' batches (each ends its shards with a short one) to `size` rows."""
    images, keys = [], []
    for batch, names in loader:
        images.append(batch)
        keys += names
        while len(keys) >= size:
            joined = torch.cat(images)
            yield joined[:size], keys[:size]
            images, keys = [joined[size:]], keys[size:]
    if keys:
        yield torch.cat(images), keys


@torch.no_grad()
def embed_split(model: nn.Module, folder: Path, transform, batch_size: int, device: torch.device,
                desc: str = "embed", workers: int = 0, parts: Path | None = None,
                precision: str = "auto") -> dict[str, np.ndarray]:
    """The whole split's embeddings (fp32 whatever the precision), labels and keys in shard order, on
    every rank. `workers`: DataLoader processes decoding per rank; `parts`: a folder for per-shard
    results (resumable); `precision`: train.precision (pipeline/parallel/precision.py)."""
    model.eval()
    rank, world = distributed.rank(), distributed.world_size()
    index = ShardIndex.load(Path(folder))
    if not index.shards:
        return {"embeddings": np.zeros((0, 0), np.float32), "labels": index.labels.copy(), "keys": np.array([], str)}
    counts = index.shard_counts()
    position = {key: i for i, key in enumerate(index.keys)}
    saved = [s for s in range(len(index.shards)) if parts is not None and (parts / f"{s:06d}.npz").is_file()]
    saved = broadcast_object(saved)  # rank 0's view, taken before any rank writes: all deal out the same list
    todo = [s for s in range(len(index.shards)) if s not in saved]
    mine = _by_rank(todo, rank, world)
    steps = max(math.ceil(sum(counts[_by_rank(todo, r, world)]) / batch_size) for r in range(world))

    rows: dict[int, list[tuple[int, np.ndarray]]] = {s: [] for s in mine}  # shard -> (position, embedding)
    finished: dict[int, dict] = {}
    batches = _exact_batches(_stream(index, mine, transform, batch_size, workers), batch_size) if mine else iter(())
    blank = None
    for _ in progress(range(steps), desc, total=steps, rank=rank, unit="batch"):
        batch = next(batches, None)
        if batch is None:  # this rank's shards are done: a blank batch keeps the forward passes in step
            blank = blank if blank is not None else torch.stack([transform(Image.new("RGB", (64, 64)))] * batch_size)
            batch = (blank, [])
        images, keys = batch
        with autocast(device, precision):
            out = model(images.to(device, non_blocking=True)).float().cpu().numpy()
        for key, embedding in zip(keys, out):
            i = position[key]
            shard = int(index.locations[i, 0])
            rows[shard].append((i, embedding))
            if len(rows[shard]) == counts[shard]:
                finished[shard] = _save_part(parts, shard, rows.pop(shard))
    assert not rows, f"shards {sorted(rows)} were not read completely"
    return _assemble(_merge(finished, parts, len(index.shards), world), index)


def _merge(finished: dict[int, dict], parts: Path | None, n_shards: int, world: int) -> dict[int, dict]:
    """Every shard's part, on every rank: gathered from the ranks, or read back from `parts`."""
    if parts is None:
        gathered = [finished]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, finished)
        return {s: part for share in gathered for s, part in share.items()}
    if world > 1:
        dist.barrier()  # every rank's parts are on disk
    return {s: _load_part(parts, s) for s in range(n_shards)}


def _save_part(parts: Path | None, shard: int, rows: list[tuple[int, np.ndarray]]) -> dict:
    rows.sort(key=lambda r: r[0])
    positions = np.array([i for i, _ in rows], dtype=np.int64)
    part = {"positions": positions, "embeddings": np.stack([e for _, e in rows])}
    if parts is not None:
        save_embeddings(parts / f"{shard:06d}.npz", part)
    return part


def _load_part(parts: Path, shard: int) -> dict:
    return load_embeddings(parts / f"{shard:06d}.npz")


def _assemble(merged: dict[int, dict], index: ShardIndex) -> dict[str, np.ndarray]:
    shards = [merged[s] for s in range(len(index.shards))]
    positions = np.concatenate([p["positions"] for p in shards])
    assert np.array_equal(positions, np.arange(len(index))), "the merged parts do not cover the split once"
    return {"embeddings": np.concatenate([p["embeddings"] for p in shards]), "labels": index.labels.copy(),
            "keys": np.array(index.keys)}


def save_embeddings(path: Path, data: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)


def load_embeddings(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
