"""One converter per dataset: `convert(cfg) -> {split: iterable of Record}` with class-disjoint splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from pipeline.config import DataConfig
from pipeline.errors import UserError


@dataclass
class Record:
    key: str                       # unique within its split, safe as a tar member name
    label: int
    image: Image.Image | Path      # an image in memory, or a file the shard writer opens
    meta: dict = field(default_factory=dict)


@dataclass
class LeftOut:
    """What a user's own data held that the converter did not use; the shard stage names it in its log
    and in shards/summary.json, so a class never vanishes without a line."""
    empty_classes: list[str] = field(default_factory=list)   # class folders (or CSV labels) with no image
    unreadable: list[str] = field(default_factory=list)      # folders that could not be listed: "path (reason)"
    ignored_files: list[str] = field(default_factory=list)   # files that are not images (by extension)
    missing_files: list[str] = field(default_factory=list)   # CSV rows whose file does not exist


class Splits(dict):
    """A converter's {split: records}, with what it left out (converters of fixed datasets return a plain dict)."""

    def __init__(self, splits: dict, left_out: LeftOut):
        super().__init__(splits)
        self.left_out = left_out


Converter = Callable[[DataConfig, int], dict[str, Iterable[Record]]]


def _registry() -> dict[str, Converter]:
    from pipeline.data.converters import (
        cars,
        csv,
        cub,
        digits,
        fashion_mnist,
        glyphs,
        imagefolder,
        inat,
        inshop,
        sop,
        vehicleid,
    )
    return {"digits": digits.convert, "fashion_mnist": fashion_mnist.convert, "imagefolder": imagefolder.convert,
            "csv": csv.convert, "cub": cub.convert, "cars": cars.convert, "sop": sop.convert, "inshop": inshop.convert,
            "inat": inat.convert, "vehicleid": vehicleid.convert, "glyphs": glyphs.convert}


def convert(cfg: DataConfig, seed: int) -> dict[str, Iterable[Record]]:
    converters = _registry()
    if cfg.name not in converters:
        raise UserError(f"no converter for data.name={cfg.name}; available: {', '.join(sorted(converters))}")
    return converters[cfg.name](cfg, seed)


def require_root(cfg: DataConfig, *expected: str) -> Path:
    """The dataset folder, checked to exist and to hold the files the converter reads."""
    if not cfg.root:
        raise UserError(f"data={cfg.name} needs data.root=/path/to/{cfg.name} (the dataset folder)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.root={cfg.root} is not a folder; point it at the {cfg.name} dataset")
    for name in expected:
        if not (root / name).exists():
            raise UserError(f"data.root={cfg.root} has no {name}; set data.root to the {cfg.name} folder that holds it")
    return root


def find_file(cfg: DataConfig, root: Path, *candidates: str) -> Path:
    """The first of `candidates` (paths relative to root) that exists: datasets ship in a few layouts."""
    for name in candidates:
        if (root / name).is_file():
            return root / name
    raise UserError(f"data.root={cfg.root} has no {candidates[0]}; set data.root to the {cfg.name} folder that holds it")


def read_rows(path: Path, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a text list file, after `skip` header lines; blank lines dropped."""
    lines = path.read_text().splitlines()[skip:]
    return [line.split() for line in lines if line.strip()]


def split_classes(cfg: DataConfig, classes: list[str], seed: int) -> set[str]:
    """The test classes: a seeded data.test_fraction of `classes` (at least one), the rest train."""
    if len(classes) < 2:
        raise UserError(f"data.root={cfg.root} has {len(classes)} class(es); an open-set split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(classes))
    n_test = min(len(classes) - 1, max(1, round(cfg.test_fraction * len(classes))))
    return {classes[i] for i in order[:n_test]}


def image_record(root: Path, relative: str, label: int, key: str, **meta) -> Record:
    return Record(key=key, label=label, image=root / relative, meta={"path": relative, **meta})
