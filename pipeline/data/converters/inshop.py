"""In-Shop Clothes Retrieval: `list_eval_partition.txt` (at the root or in `Eval/`): a count line,
the header "image_name item_id evaluation_status", then "img/WOMEN/.../01_1_front.jpg id_00000002
train|query|gallery". Images are found under the root or under `Img/`. Labels are the item
numbers (`id_00000002` -> 2), shared by query and gallery.
"""
from __future__ import annotations

from pipeline.config import DataConfig
from pipeline.data.converters import find_file, image_record, read_rows, require_root
from pipeline.errors import UserError

SPLITS = ("train", "query", "gallery")


def convert(cfg: DataConfig, seed: int) -> dict[str, list]:
    root = require_root(cfg)
    rows = read_rows(find_file(cfg, root, "list_eval_partition.txt", "Eval/list_eval_partition.txt"), skip=2)
    images = root / "Img" if (root / "Img").is_dir() else root
    splits: dict[str, list] = {split: [] for split in SPLITS}
    for i, (path, item, status) in enumerate(rows):
        if status not in splits:
            raise UserError(f"list_eval_partition.txt line {i + 3}: status '{status}' is not one of {', '.join(SPLITS)}")
        splits[status].append(image_record(images, path, int(item.removeprefix("id_")), key=f"shop{i:06d}", item=item))
    return splits
