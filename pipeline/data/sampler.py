"""The class-balanced P x K sampler: a global batch of P groups of K same-class samples.

The batch at step t is a function of (seed, t) alone, never of the number of processes, so runs
on different world sizes see the same data, and a resumed run continues exactly where it was.
"""
from __future__ import annotations

import numpy as np


class PKSampler:
    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int):
        self.batch_size, self.k, self.seed = batch_size, samples_per_class, seed
        self.classes, inverse = np.unique(labels, return_inverse=True)
        self.members = [np.flatnonzero(inverse == c) for c in range(len(self.classes))]
        if len(self.classes) < 2:
            raise ValueError("the P x K sampler needs at least 2 classes")

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
