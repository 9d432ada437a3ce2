"""Webdataset tar shards: write a split, index it for random access, read it back.

Layout of a split folder: `<split>-000000.tar ...` (each sample: `__key__`, the image under
png/jpg/webp, the label under `cls`, metadata under `json`) and `index.json`, the per-shard sample
index: the shard names in order, and for every sample its shard number, key, label and the byte
range of its image inside that shard, and `class_names` (label -> name) where the dataset names its
classes (imagefolder's folders, a CSV's labels), for pictures and reports. Samples are listed shard by shard, in the order they were
written. A P x K sampler draws classes from the labels alone, and reading one sample is one
`pread` of one byte range of one shard (each process keeps its shards open), never a scan.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps

from pipeline.data.converters import Record
from pipeline.progress import progress

log = logging.getLogger(__name__)
IMAGE_EXTS = ("png", "jpg", "webp")
SAVE_FORMAT = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


def _load(record: Record, size: int) -> Image.Image:
    """Open (and fully decode, to catch truncation) an image; shrink its shorter side to `size` (0: keep it)."""
    image = record.image
    if not isinstance(image, Image.Image):
        with Image.open(image) as f:
            f.load()
            image = ImageOps.exif_transpose(f)
    image = image.convert("L" if image.mode in ("L", "1") else "RGB")
    if 0 < size < min(image.size):
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=SAVE_FORMAT[fmt], **({"quality": 95} if fmt != "png" else {}))
    return buf.getvalue()


def _prepare(record: Record, size: int, fmt: str) -> tuple[str, int, dict, bytes | None, str | None]:
    """Decode, shrink and re-encode one record (in a worker process): (key, label, meta, bytes, error)."""
    try:
        return record.key, record.label, record.meta, _encode(_load(record, size), fmt), None
    except Exception as e:  # a broken file is skipped and counted, never fatal
        return record.key, record.label, record.meta, None, f"{type(e).__name__}: {e}"


def _prepared(records: Iterable[Record], size: int, fmt: str, workers: int) -> Iterator[tuple]:
    """The records prepared in order, by `workers` processes (0: in this one)."""
    prepare = partial(_prepare, size=size, fmt=fmt)
    if workers <= 0:
        yield from map(prepare, records)
        return
    # spawn, not fork: the caller may hold a process group and threads; the workers only need PIL.
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(prepare, records, chunksize=8)


# Below this many images per worker, starting a worker (spawn, PIL's import: about a second on a busy
# machine) costs more than it saves: 160 images took 16-43 s with 4 workers on 2 cores, under 1 s with none.
IMAGES_PER_WORKER = 1000
MAX_WORKERS = 8  # what the dataset presets used to set: more gains little, the tars are written by one process


def auto_workers(images: int | None, cores: int | None = None) -> int:
    """data.shard_workers when not given: none for a small (or unknown-size) split or a machine of 2 cores
    (the main process writes the tars and needs a core), else one per IMAGES_PER_WORKER images, up to the
    cores less one and MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    workers = min(cores - 1, MAX_WORKERS, (images or 0) // IMAGES_PER_WORKER)
    return workers if workers >= 2 else 0


def write_split(records: Iterable[Record], out: Path, split: str, image_size: int, image_format: str,
                max_count: int, max_size: int, workers: int | None = 0) -> dict:
    """Write one split's shards and index into `out`; return its summary (images, classes, skipped).

    Decoding and encoding run in `workers` processes; the tars are written here, in record order,
    with a fixed mtime, so the output is byte-identical whatever the number of workers.
    """
    if image_format not in SAVE_FORMAT:
        raise ValueError(f"image format {image_format} not in {list(SAVE_FORMAT)}")
    out.mkdir(parents=True, exist_ok=True)
    total = len(records) if hasattr(records, "__len__") else None
    if workers is None:
        workers = auto_workers(total)
        log.info("shard %s: %d worker process(es) for %s images (data.shard_workers sets it)", split, workers,
                 total if total is not None else "an unknown number of")
    labels, skipped, names = [], [], {}
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=max_count, maxsize=max_size, verbose=0,
                         mtime=0) as sink:
        prepared = _prepared(records, image_size, image_format, workers)
        for key, label, meta, data, error in progress(prepared, f"shard {split}", total=total, unit="image"):
            if error is not None:
                log.warning("skipping %s (%s): %s", key, meta.get("path", ""), error)
                skipped.append(meta.get("path", key))
                continue
            sink.write({"__key__": key, image_format: data, "cls": label, "json": meta})
            labels.append(label)
            if "class" in meta:
                names[str(label)] = str(meta["class"])
    index = build_index(out)
    if names:
        index["class_names"] = names
    (out / "index.json").write_text(json.dumps(index))
    per_class = np.unique(labels, return_counts=True)[1] if labels else np.zeros(1, dtype=int)
    return {"images": len(labels), "classes": len(set(labels)), "shards": len(index["shards"]),
            "images_per_class": {"min": int(per_class.min()), "mean": round(float(per_class.mean()), 2),
                                 "max": int(per_class.max())},
            "skipped": len(skipped), "skipped_files": skipped[:100]}


# Per sample besides its image: a 512-byte tar header for each of its 3 members (image, cls, json),
# one 512-byte block each for cls and json, and its entry in index.json.
SAMPLE_OVERHEAD = 3 * 512 + 2 * 512 + 40


def estimated_size(records: Iterable[Record], image_size: int, image_format: str, sample: int = 8) -> tuple[int, int]:
    """(number of records, estimated bytes of their shards), from the first `sample` images prepared
    as write_split prepares them (tar members are padded to 512 bytes). Cheap: one pass over the
    records (paths or small images), `sample` decodes."""
    count, sizes = 0, []
    for record in records:
        if len(sizes) < sample:
            data = _prepare(record, image_size, image_format)[3]
            if data is not None:
                sizes.append(-(-len(data) // 512) * 512)
        count += 1
    return count, int(count * ((sum(sizes) / len(sizes) if sizes else 0) + SAMPLE_OVERHEAD))


def build_index(folder: Path) -> dict:
    """Scan the tars once: per sample its shard, key, label and the byte range of its image."""
    shards = sorted(p.name for p in folder.glob("*.tar"))
    samples = []
    for s, name in enumerate(shards):
        members: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(folder / name) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = info
            for key, parts in members.items():
                image = next(parts[e] for e in IMAGE_EXTS if e in parts)
                label = int(tar.extractfile(parts["cls"]).read())
                samples.append([s, key, label, image.offset_data, image.size])
    return {"shards": shards, "samples": samples}


@dataclass
class ShardIndex:
    """Random access to the images of one split by sample number."""
    folder: Path
    shards: list[str]
    keys: list[str]
    labels: np.ndarray
    locations: np.ndarray  # (n, 3): shard number, byte offset, byte size
    class_names: dict = None  # label (int) -> the dataset's name for it, where it has names
    _files: dict = None     # shard number -> open file descriptor, per process

    def class_name(self, label: int) -> str:
        """The dataset's name for a class, else `class <label>`."""
        return (self.class_names or {}).get(int(label), f"class {label}")

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptors
        return {**self.__dict__, "_files": None}

    @classmethod
    def load(cls, folder: Path) -> "ShardIndex":
        index = json.loads((Path(folder) / "index.json").read_text())
        rows = index["samples"]
        return cls(Path(folder), index["shards"], [r[1] for r in rows],
                   np.array([r[2] for r in rows], dtype=np.int64),
                   np.array([[r[0], r[3], r[4]] for r in rows], dtype=np.int64).reshape(-1, 3),
                   {int(k): v for k, v in index.get("class_names", {}).items()})

    def __len__(self) -> int:
        return len(self.labels)

    def shard_counts(self) -> np.ndarray:
        """Samples per shard, in shard order."""
        return np.bincount(self.locations[:, 0], minlength=len(self.shards))

    def image_bytes(self, i: int) -> bytes:
        """Sample i's image as stored in its shard (PNG, JPEG or WebP bytes)."""
        shard, offset, size = (int(v) for v in self.locations[i])
        if self._files is None:
            self._files = {}
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / self.shards[shard], os.O_RDONLY)
        return os.pread(self._files[shard], size, offset)

    def image(self, i: int) -> Image.Image:
        return Image.open(io.BytesIO(self.image_bytes(i))).convert("RGB")
