"""How many images a plan's epoch has: the training split of the run's dataset, known before the
minutes of simulation. plan.train_images if given; else the run's own shards (shards/summary.json, the
exact count after data.val_classes); else the built-in dataset's standard training split; else a
folder or CSV of the user's own, counted as the shard stage would read it."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import UserError

# Images in the training split (the standard class-disjoint splits): SOP 59,551 (Oh Song et al. 2016),
# CUB-200-2011 first 100 classes 5,864, Cars196 first 98 classes 8,054, In-Shop train 25,882, iNaturalist
# 2018 (Brown et al. 2020's split) 325,846, VehicleID train 110,178 (Liu et al. 2016); Fashion-MNIST
# classes 0-4 of its 60,000 training images, scikit-learn's digits classes 0-4 of 1,797 (the converters'
# splits). Before data.val_classes holds some training classes out: the shards' count is exact.
TRAIN_IMAGES = {"sop": 59551, "cub": 5864, "cars": 8054, "inshop": 25882, "inat": 325846, "vehicleid": 110178,
                "fashion_mnist": 30000, "digits": 901}


def train_images(cfg: Config) -> int:
    """The training images of an epoch (see the module doc); a UserError saying what to set if unknown."""
    if cfg.plan.train_images:
        return cfg.plan.train_images
    sharded = _sharded(cfg)
    if sharded is not None:
        return sharded
    if cfg.data.name in TRAIN_IMAGES:
        return TRAIN_IMAGES[cfg.data.name]
    if cfg.data.name in ("imagefolder", "csv") and cfg.data.root:
        return _counted(cfg)
    raise UserError(f"the training split of data={cfg.data.name} has no known size; run stage=shard on this run_dir "
                    f"first (its shards are counted) or set plan.train_images")


def _sharded(cfg: Config) -> int | None:
    """The run directory's training shards' count, if they are of this dataset."""
    summary = Path(cfg.run_dir) / "shards" / "summary.json"
    try:
        found = json.loads(summary.read_text())
        return int(found["splits"]["train"]["images"]) if found.get("dataset") == cfg.data.name else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _counted(cfg: Config) -> int:
    """The training records of the user's folder or CSV (a missing folder is the converter's one line)."""
    from pipeline.data.converters import convert
    from pipeline.data.val_split import hold_out_classes

    return len(list(hold_out_classes(convert(cfg.data, cfg.data.seed), cfg.data.val_classes, cfg.data.seed)["train"]))
