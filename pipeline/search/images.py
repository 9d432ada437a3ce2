"""Gallery images by key, for stage=serve's page (GET /image/{key}): the bytes as stored in the shards.

Only two kinds of folder are reachable: the index's gallery (no split named) and the split folders of
the run's own shards (run_dir/shards/<split>, listed once at start). A client names a key and, at most,
one of those split names: both are looked up in tables built here, never joined into a path, so no
other file can be read. Each split's key table is built on its first request (its index.json: no scan).
"""
from __future__ import annotations

import threading
from pathlib import Path

from pipeline.data.shards import ShardIndex

GALLERY = ""  # the split name of the index's gallery
MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"RIFF", "image/webp"))


def media_type(data: bytes) -> str:
    """The shards hold PNG, JPEG or WebP (pipeline/data/shards.py): told apart by their first bytes."""
    return next((kind for magic, kind in MAGIC if data.startswith(magic)), "application/octet-stream")


class ImageStore:
    """Key (and split) -> image bytes, from the index's gallery and the run's shards. Thread-safe."""

    def __init__(self, gallery: Path, shards: Path | None = None):
        self.folders = {GALLERY: Path(gallery)}
        if shards is not None and shards.is_dir():
            self.folders.update({p.name: p for p in sorted(shards.iterdir()) if (p / "index.json").is_file()})
        self._tables: dict[str, tuple[ShardIndex, dict[str, int]]] = {}
        self._lock = threading.Lock()

    def splits(self) -> list[str]:
        return [name for name in self.folders if name != GALLERY]

    def is_gallery(self, split: str) -> bool:
        """Whether a split of the run's shards is the index's gallery (its keys are the index's items)."""
        folder = self.folders.get(split)
        return folder is not None and folder.resolve() == self.folders[GALLERY].resolve()

    def get(self, key: str, split: str = GALLERY) -> tuple[bytes, str] | None:
        """(bytes, media type) of the image stored under `key` in `split`; None where there is none."""
        if split not in self.folders:
            return None
        with self._lock:  # ShardIndex opens each shard once
            index, rows = self._table(split)
            i = rows.get(key)
            if i is None:
                return None
            data = index.image_bytes(i)
        return data, media_type(data)

    def class_name(self, split: str, label: int) -> str:
        """The dataset's name for a class of `split` (ShardIndex.class_name), else `class <label>`."""
        if split not in self.folders:
            return f"class {label}"
        with self._lock:
            return self._table(split)[0].class_name(label)

    def _table(self, split: str) -> tuple[ShardIndex, dict[str, int]]:
        """The split's index and key -> sample table, built on first use (call under the lock)."""
        if split not in self._tables:
            index = ShardIndex.load(self.folders[split])
            self._tables[split] = index, {k: i for i, k in enumerate(index.keys)}
        return self._tables[split]
