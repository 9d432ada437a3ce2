"""iNaturalist 2018 with the Smooth-AP open-set split (Brown et al., ECCV 2020).

Reads the split files `Inaturalist_train_set1.txt` and `Inaturalist_test_set1.txt` (at the root or
in `Inat_dataset_splits/`): one image path per line, relative to the root, e.g.
`train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg`. The label is the species
folder's number (the path's last folder); train and test species are disjoint.
"""
from __future__ import annotations

from pathlib import PurePosixPath

from pipeline.config import DataConfig
from pipeline.data.converters import find_file, image_record, read_rows, require_root
from pipeline.errors import UserError

FILES = {"train": "Inaturalist_train_set1.txt", "test": "Inaturalist_test_set1.txt"}


def convert(cfg: DataConfig, seed: int) -> dict[str, list]:
    root = require_root(cfg)
    splits: dict[str, list] = {}
    for split, name in FILES.items():
        records = []
        for i, (path, *_) in enumerate(read_rows(find_file(cfg, root, name, f"Inat_dataset_splits/{name}"))):
            species = PurePosixPath(path).parent.name
            if not species.isdigit():
                raise UserError(f"{name} line {i + 1}: '{path}' has no numeric species folder (…/<species id>/<image>)")
            records.append(image_record(root, path, int(species), key=f"inat{i:07d}"))
        splits[split] = records
    return splits
