"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 70,000 28x28 grey product images in 10 classes.

Reads the four IDX `.gz` files that Debian's `dataset-fashion-mnist` package installs in
/usr/share/datasets/fashion-mnist (or data.root). Open-set split as in Roth et al.'s protocol:
train = classes 0-4 of the train set, test = classes 5-9 of the test set. Images are resized to
data.image_size.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.converters import Record
from pipeline.errors import UserError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = {"train": range(0, 5), "test": range(5, 10)}
IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), ndim big-endian int32 sizes, the data."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    except (OSError, EOFError, struct.error) as e:
        raise UserError(f"{path} is not a readable gzipped IDX file ({e}); reinstall dataset-fashion-mnist") from None
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if zero != 0 or dtype != IDX_UBYTE or body.size != int(np.prod(shape)):
        raise UserError(f"{path} is not an IDX file of unsigned bytes of shape {shape}; reinstall dataset-fashion-mnist")
    return body.reshape(shape)


def _root(cfg: DataConfig) -> Path:
    root = Path(cfg.root or DEFAULT_ROOT).expanduser()
    missing = [name for pair in FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise UserError(f"Fashion-MNIST not found in {root} (missing {missing[0]}): "
                        f"apt-get install dataset-fashion-mnist, or set data.root to the folder of its IDX .gz files")
    return root


def _records(root: Path, split: str, size: int) -> Iterator[Record]:
    images, labels = (read_idx(root / name) for name in FILES[split])
    if len(images) != len(labels):
        raise UserError(f"{root}: {FILES[split][0]} has {len(images)} images but {FILES[split][1]} {len(labels)} labels")
    for i in np.flatnonzero(np.isin(labels, list(CLASSES[split]))):
        image = Image.fromarray(images[i], mode="L")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        yield Record(key=f"{split}{i:05d}", label=int(labels[i]), image=image, meta={"index": int(i)})


def convert(cfg: DataConfig, seed: int) -> dict[str, Iterator[Record]]:
    root = _root(cfg)
    return {split: _records(root, split, cfg.image_size) for split in FILES}
