"""PKU VehicleID: `train_test_split/train_list.txt` and `test_list_{800,1600,2400}.txt`, lines
"<image name> <vehicle id>"; images at `image/<image name>.jpg`.

For each test size S: `test{S}`, the whole list (the default protocol: leave-one-out inside it, as
the RS@k authors evaluate, src/datasets.py:159-206), and the gallery form of the same images: one
image per vehicle drawn at random (seeded) as `test{S}_gallery`, the others as `test{S}_query`.
The test images are stored twice (about 40,000 images over the three lists) so that both forms
evaluate from the shards.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.converters import Record, find_file, image_record, read_rows, require_root

TEST_SIZES = (800, 1600, 2400)


def _records(cfg: DataConfig, root, name: str) -> list[Record]:
    rows = read_rows(find_file(cfg, root, f"train_test_split/{name}", name))
    return [image_record(root, f"image/{image}.jpg", int(vehicle), key=f"v{image}") for image, vehicle in rows]


def convert(cfg: DataConfig, seed: int) -> dict[str, list]:
    root = require_root(cfg)
    splits: dict[str, list] = {"train": _records(cfg, root, "train_list.txt")}
    for size in TEST_SIZES:
        records = _records(cfg, root, f"test_list_{size}.txt")
        splits[f"test{size}"] = records
        by_vehicle = defaultdict(list)
        for i, record in enumerate(records):
            by_vehicle[record.label].append(i)
        rng = np.random.default_rng([seed, size])
        gallery = {int(rng.choice(members)) for _, members in sorted(by_vehicle.items())}
        splits[f"test{size}_query"] = [r for i, r in enumerate(records) if i not in gallery]
        splits[f"test{size}_gallery"] = [r for i, r in enumerate(records) if i in gallery]
    return splits
