"""scikit-learn's digits: 1,797 8x8 grey images bundled with scikit-learn, so no download.

Upsampled to data.image_size. Open-set split: classes 0-4 train, 5-9 test.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import DataConfig
from pipeline.data.converters import Record

TRAIN_CLASSES = range(0, 5)


def convert(cfg: DataConfig, seed: int) -> dict[str, list[Record]]:
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # pixel values are 0..16
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for i, (pixels, label) in enumerate(zip(images, digits.target)):
        image = Image.fromarray(pixels, mode="L").resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
        split = "train" if label in TRAIN_CLASSES else "test"
        splits[split].append(Record(key=f"digit{i:05d}", label=int(label), image=image, meta={"index": i}))
    return splits
