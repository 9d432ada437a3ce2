"""A user's own images, `root/<class>/<image>`, split class-disjointly (open set) by a seeded fraction."""
from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.data.converters import Record, require_root, split_classes
from pipeline.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def convert(cfg: DataConfig, seed: int) -> dict[str, list[Record]]:
    root = require_root(cfg)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise UserError(f"data.root={cfg.root} needs at least 2 class folders (root/<class>/<image>)")
    test = split_classes(cfg, classes, seed)
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in EXTENSIONS)
        for j, path in enumerate(files):
            meta = {"class": name, "path": str(path.relative_to(root))}
            splits["test" if name in test else "train"].append(
                Record(key=f"c{label:05d}_{j:06d}", label=label, image=path, meta=meta))
    return splits
