"""A user's own labelled images listed in a CSV file with the header `path,label` (paths relative to
the file's folder, or absolute; labels any strings). data.root is the CSV file. Classes are split
class-disjointly (open set) by a seeded fraction, as for imagefolder.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.converters import Record, split_classes
from pipeline.errors import UserError


def convert(cfg: DataConfig, seed: int) -> dict[str, list[Record]]:
    path = Path(cfg.root or "").expanduser()
    if not cfg.root or not path.is_file():
        raise UserError(f"data=csv needs data.root=/path/to/labels.csv (a CSV file with columns path,label); got {cfg.root}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: the header must name the columns path,label (it has {reader.fieldnames})")
        rows = [(row["path"], row["label"]) for row in reader]
    classes = sorted({label for _, label in rows})
    test = split_classes(cfg, classes, seed)
    ids = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for j, (image, label) in enumerate(rows):
        record = Record(key=f"row{j:07d}", label=ids[label], image=path.parent / image, meta={"path": image, "class": label})
        splits["test" if label in test else "train"].append(record)
    return splits
