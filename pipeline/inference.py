"""Embed a whole split with a model in eval mode, and store/load embeddings as .npz."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.data.shards import stream_split
from pipeline.engine import autocast


@torch.no_grad()
def embed_split(model: nn.Module, folder: Path, transform, batch_size: int, device: torch.device,
                total: int | None = None, desc: str = "embed") -> dict[str, np.ndarray]:
    model.eval()
    outputs, labels, keys, images = [], [], [], []

    def flush():
        batch = torch.stack(images).to(device, non_blocking=True)
        with autocast(device):
            outputs.append(model(batch).float().cpu())
        images.clear()

    for key, image, label in tqdm(stream_split(folder), total=total, desc=desc, leave=False, mininterval=2):
        images.append(transform(image))
        labels.append(label)
        keys.append(key)
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    return {"embeddings": torch.cat(outputs).numpy(), "labels": np.array(labels, dtype=np.int64),
            "keys": np.array(keys)}


def save_embeddings(path: Path, data: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)


def load_embeddings(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
