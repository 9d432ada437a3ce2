"""One converter per dataset: `convert(cfg) -> {split: iterable of Record}` with class-disjoint splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from pipeline.config import DataConfig
from pipeline.errors import UserError


@dataclass
class Record:
    key: str                       # unique within its split, safe as a tar member name
    label: int
    image: Image.Image | Path      # an image in memory, or a file the shard writer opens
    meta: dict = field(default_factory=dict)


Converter = Callable[[DataConfig, int], dict[str, Iterable[Record]]]


def _registry() -> dict[str, Converter]:
    from pipeline.data.converters import digits, fashion_mnist, imagefolder
    return {"digits": digits.convert, "fashion_mnist": fashion_mnist.convert, "imagefolder": imagefolder.convert}


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
            raise UserError(f"data.root={cfg.root} has no {name}; is it the {cfg.name} dataset?")
    return root
