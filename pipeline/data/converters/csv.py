"""A user's own labelled images listed in a CSV file with the header `path,label` (paths relative to
the file's folder, or absolute; labels any strings). data.root is the CSV file. Classes are split
class-disjointly (open set) by a seeded fraction, as for imagefolder. Rows whose file is missing or
not an image are left out and named (LeftOut) before the split, as are labels left with no row.
"""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.converters import LeftOut, Record, Splits, split_classes
from pipeline.data.converters.imagefolder import EXTENSIONS
from pipeline.errors import UserError


def _usable(rows: list[tuple[str, str]], folder: Path, left_out: LeftOut) -> list[tuple[int, str, str]]:
    """(row number, path, label) of the rows that name an image file that exists; the others go to
    left_out, and so do labels left with no row."""
    kept = []
    for j, (image, label) in enumerate(rows):
        if Path(image).suffix.lower() not in EXTENSIONS:
            left_out.ignored_files.append(image)
        elif not (folder / image).is_file():
            left_out.missing_files.append(image)
        else:
            kept.append((j, image, label))
    left_out.empty_classes += sorted({label for _, label in rows} - {label for _, _, label in kept})
    return kept


def convert(cfg: DataConfig, seed: int) -> Splits:
    path = Path(cfg.root or "").expanduser()
    if not cfg.root or not path.is_file():
        raise UserError(f"data=csv needs data.root=/path/to/labels.csv (a CSV file with columns path,label); got {cfg.root}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: the header must name the columns path,label (it has {reader.fieldnames})")
        rows = [(row["path"], row["label"]) for row in reader]
    left_out = LeftOut()
    rows = _usable(rows, path.parent, left_out)
    classes = sorted({label for _, _, label in rows})
    test = split_classes(cfg, classes, seed)
    ids = {name: i for i, name in enumerate(classes)}
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for j, image, label in rows:
        record = Record(key=f"row{j:07d}", label=ids[label], image=path.parent / image, meta={"path": image, "class": label})
        splits["test" if label in test else "train"].append(record)
    return Splits(splits, left_out)
