"""Stanford Online Products: `Ebay_train.txt` and `Ebay_test.txt`, each with the header
"image_id class_id super_class_id path" (ids 1-based; paths relative to the dataset folder).
The standard split: the train file's 11,318 products train, the test file's 11,316 test.
"""
from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.data.converters import find_file, image_record, read_rows, require_root

FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


def convert(cfg: DataConfig, seed: int) -> dict[str, list]:
    root = require_root(cfg)
    splits: dict[str, list] = {}
    for split, name in FILES.items():
        rows = read_rows(find_file(cfg, root, name), skip=1)
        splits[split] = [image_record(root, path, int(class_id), key=f"sop{int(image_id):06d}",
                                      super_class=int(super_id))
                         for image_id, class_id, super_id, path in rows]
    return splits
