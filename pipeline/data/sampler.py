"""The class-balanced P x K sampler: a global batch of P groups of K same-class samples.

The batch at step t is a function of (seed, t) alone, never of the number of processes, so runs
on different world sizes see the same data, and a resumed run continues exactly where it was.
Under several processes every rank computes the same global batch (cheap: labels only) and takes
its own contiguous slice of positions, so the ranks' slices are disjoint and together are the
global batch, with no communication.
"""
from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)


class PKSampler:
    """small_classes: what happens to a class with fewer than K images. `repeat`: it is drawn like any
    other and its images repeat within its group (Roth et al.'s sampler draws with replacement,
    datasampler/class_random_sampler.py:43; IBC pads, combine_sampler.py:47-49); `skip`: it is never
    drawn (the RS@k authors' batches, src/datasets.py:325)."""

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int,
                 small_classes: str = "repeat"):
        self.batch_size, self.k, self.seed, self.small_classes = batch_size, samples_per_class, seed, small_classes
        classes, inverse = np.unique(labels, return_inverse=True)
        members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        keep = [c for c, m in enumerate(members) if small_classes == "repeat" or len(m) >= samples_per_class]
        self.classes, self.members = classes[keep], [members[c] for c in keep]
        if len(classes) < 2:
            raise ValueError("the P x K sampler needs at least 2 classes")
        if len(self.classes) < 2:
            raise UserError(f"train.small_classes=skip leaves {len(self.classes)} of {len(classes)} classes with at least "
                            f"train.samples_per_class={samples_per_class} images; lower samples_per_class or use repeat")
        groups = batch_size // samples_per_class
        # A class in several groups of a batch is harmless while it has the images to fill them with distinct
        # samples (the digits demo: 32 groups of 5 classes, 180 images each); warned only when images repeat.
        per_class = -(-groups // len(self.classes)) * samples_per_class
        if groups > len(self.classes) and any(len(m) < per_class for m in self.members):
            log.warning("train.global_batch=%d / train.samples_per_class=%d needs %d classes per batch but the training "
                        "split has %d: some classes appear in several groups of one batch; lower train.global_batch "
                        "to %d or raise train.samples_per_class", batch_size, samples_per_class, groups,
                        len(self.classes), len(self.classes) * samples_per_class)

    def settings(self) -> dict:
        """What decides the batches: with the step, the data position saved in a checkpoint."""
        return {"seed": self.seed, "global_batch": self.batch_size, "samples_per_class": self.k,
                "small_classes": self.small_classes}

    def batch(self, step: int) -> np.ndarray:
        """Indices of the global batch at `step`: P = batch_size / K class groups of K samples.

        Classes are drawn without replacement; when P exceeds the number of classes a class gets
        several groups, filled with distinct samples while the class has enough.
        """
        rng = np.random.default_rng([self.seed, step])
        groups = self.batch_size // self.k
        n_classes = len(self.classes)
        order = np.concatenate([rng.permutation(n_classes) for _ in range(-(-groups // n_classes))])[:groups]
        picks = np.bincount(order, minlength=n_classes) * self.k
        batch = []
        for c in order[np.sort(np.unique(order, return_index=True)[1])]:  # first-appearance order
            members = self.members[c]
            replace = picks[c] > len(members)
            batch.append(rng.choice(members, size=picks[c], replace=replace))
        return np.concatenate(batch)

    def augmentation_seeds(self, step: int) -> np.ndarray:
        """One seed per position of the global batch at `step`, for that sample's random crop and flip."""
        return np.random.default_rng([self.seed, step, 1]).integers(0, 2**62, self.batch_size)

    def rank_slice(self, step: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (sample indices, augmentation seeds): positions [rank * B/W, (rank + 1) * B/W)."""
        if self.batch_size % world_size:
            raise UserError(f"train.global_batch={self.batch_size} must be a multiple of the {world_size} processes")
        share = self.batch_size // world_size
        mine = slice(rank * share, (rank + 1) * share)
        return self.batch(step)[mine], self.augmentation_seeds(step)[mine]
