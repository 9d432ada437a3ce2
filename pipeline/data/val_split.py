"""The validation split: some training classes held out, whole, as `val` (for any dataset, after its converter).

`data.val_classes` below 1 is a fraction of the training classes (rounded, at least one), 1 or more
a count. The classes are a seeded draw, so the same seed gives the same split on every run, and they
come out of `train` only: `val` is class-disjoint from `train` and, as `train` is, from the test splits.
"""
from __future__ import annotations

import logging
from typing import Iterable

import numpy as np

from pipeline.data.converters import Record
from pipeline.errors import UserError

log = logging.getLogger(__name__)

SPLIT = "val"
STREAM = 0x76616C  # the seed stream of this draw ("val"), apart from the converters' test split


def held_out_count(val_classes: float, n_classes: int) -> int:
    return max(1, round(val_classes * n_classes)) if val_classes < 1 else int(val_classes)


def hold_out_classes(splits: dict[str, Iterable[Record]], val_classes: float, seed: int) -> dict[str, Iterable[Record]]:
    """`splits` with a `val` split of whole training classes taken out of `train`; unchanged if val_classes is 0."""
    if not val_classes:
        return splits
    if SPLIT in splits:
        raise UserError(f"this dataset's converter already writes a '{SPLIT}' split; set data.val_classes=0")
    train = list(splits["train"])
    classes = sorted({r.label for r in train})
    n = held_out_count(val_classes, len(classes))
    if n > len(classes) - 2:
        raise UserError(f"data.val_classes={val_classes:g} holds out {n} of the {len(classes)} training classes; "
                        f"at most {len(classes) - 2} can go (training needs 2), or set data.val_classes=0")
    order = np.random.default_rng([seed, STREAM]).permutation(len(classes))
    held = {classes[i] for i in order[:n]}
    log.info("validation split: %d of the %d training classes held out (data.val_classes=%g)", n, len(classes),
             val_classes)
    return {**splits, "train": [r for r in train if r.label not in held], SPLIT: [r for r in train if r.label in held]}
