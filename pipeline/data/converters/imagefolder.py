"""A user's own images, `root/<class>/<image>`, split class-disjointly (open set) by a seeded fraction.

Class folders with no image, folders that cannot be read and files that are not images are left out
and named (LeftOut), before the split, so the split counts only classes that have images."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.converters import LeftOut, Record, Splits, require_root, split_classes
from pipeline.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _images(root: Path, folder: Path, left_out: LeftOut) -> list[Path]:
    """The image files under `folder`, sorted; the rest and unreadable subfolders go to left_out."""
    errors: list[OSError] = []
    found = sorted(Path(top) / name for top, _, names in os.walk(folder, onerror=errors.append) for name in names)
    left_out.unreadable += [f"{Path(e.filename).relative_to(root)} ({e.strerror})" for e in errors]
    left_out.ignored_files += [str(p.relative_to(root)) for p in found if p.suffix.lower() not in EXTENSIONS]
    return [p for p in found if p.suffix.lower() in EXTENSIONS]


def convert(cfg: DataConfig, seed: int) -> Splits:
    root = require_root(cfg)
    left_out = LeftOut()
    left_out.ignored_files += sorted(p.name for p in root.iterdir() if p.is_file())  # not in a class folder
    files = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = _images(root, folder, left_out)
        if images:
            files[folder.name] = images
        else:
            left_out.empty_classes.append(folder.name)
    classes = sorted(files)
    if len(classes) < 2:
        raise UserError(f"data.root={cfg.root} needs at least 2 class folders with images (root/<class>/<image>); "
                        f"it has {len(classes)}")
    test = split_classes(cfg, classes, seed)
    splits: dict[str, list[Record]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        for j, path in enumerate(files[name]):
            meta = {"class": name, "path": str(path.relative_to(root))}
            splits["test" if name in test else "train"].append(
                Record(key=f"c{label:05d}_{j:06d}", label=label, image=path, meta=meta))
    return Splits(splits, left_out)
