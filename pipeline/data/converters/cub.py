"""CUB-200-2011: `images.txt` ("<image id> <path under images/>") and `image_class_labels.txt`
("<image id> <class id>", 1-based). The standard open-set split: classes 1-100 train, 101-200 test;
`train_test_split.txt` (a closed-set split) is ignored.
"""
from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.data.converters import find_file, image_record, read_rows, require_root

TRAIN_CLASSES = range(1, 101)


def convert(cfg: DataConfig, seed: int) -> dict[str, list]:
    root = require_root(cfg)
    root = root / "CUB_200_2011" if (root / "CUB_200_2011" / "images.txt").is_file() else root
    paths = dict(read_rows(find_file(cfg, root, "images.txt")))
    labels = dict(read_rows(find_file(cfg, root, "image_class_labels.txt")))
    splits: dict[str, list] = {"train": [], "test": []}
    for image_id, path in paths.items():
        label = int(labels[image_id])
        split = "train" if label in TRAIN_CLASSES else "test"
        splits[split].append(image_record(root, f"images/{path}", label, key=f"cub{int(image_id):06d}"))
    return splits
