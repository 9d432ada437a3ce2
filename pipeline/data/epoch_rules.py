"""The authors' samplers and their epochs (train.sampler), beside the project's P x K sampler.

    pk    PKSampler (pipeline/data/sampler.py): P classes without replacement per batch; an epoch is
          the training images // global_batch steps (as Roth et al.'s sampler counts it)
    roth  Roth et al.'s class_random_sampler.py (Confusezius/Revisiting_Deep_Metric_Learning_PyTorch):
          each of the P groups draws its class with replacement (:41-42), so a class can fill several
          groups of one batch, and its K images with replacement (:43); an epoch is images // B (:29)
    rsk   RS@k's TrainDatasetrsk.reshuffle (yash0307/RecallatK_surrogate src/datasets.py:313-334):
          each class's images shuffled and cut into floor(n / K) groups, used at most once an epoch;
          the classes in one shuffled order; a batch takes one group from each of the first P classes
          that still have one, until fewer than P have; the batches shuffled. On CUB and Cars P is the
          number of training classes, so every class is in every batch and an epoch is
          min floor(n / K) batches; on SOP (P = 1,000 of 11,318) the count depends a little on the order
    ibc   IBC's CombineSampler (dvl-tum/intra_batch combine_sampler.py:39-67): a class with fewer
          than K images is padded by repeats (:46-49); every class then gives floor(max(n, K) / K) + 1
          groups of K, its last one completed by images it already used (:53-59); the groups shuffled
          (:61) and padded to a multiple of P by repeating random groups (:62-64); an epoch is
          ceil(groups / P) batches (data_utility.py:57-64 drop_last on a multiple of the batch).
          train.redraw_pk (their CUB, config_cub_train.yaml bssampling NumberSampler): each epoch
          draws P among the divisors of B in [2, B / 2] and K = B / P (:73-86)

Every rule keeps PKSampler's guarantees: the global batch of step t is a function of (seed, t) alone
(an epoch's batches are a function of (seed, epoch), and the epochs' lengths follow from them), so
it does not depend on the number of processes, and a resumed run continues exactly.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

from pipeline.data.sampler import PKSampler
from pipeline.errors import UserError


class FixedEpochs:
    """Epochs of `per_epoch` steps each (pk, roth)."""

    def __init__(self, per_epoch: int):
        self.per_epoch = per_epoch

    def epoch_start(self, epoch: int) -> int:
        return epoch * self.per_epoch

    def step_of(self, epoch: float) -> int:
        """The step at which `epoch` (fractional allowed) begins: a milestone's step."""
        return round(epoch * self.per_epoch)

    def epoch_of(self, step: int) -> int:
        return step // self.per_epoch

    def describe(self, epochs: int | None) -> int:
        return self.per_epoch


class RothSampler(PKSampler):
    """Classes with replacement within a batch, images with replacement within a group."""

    def settings(self) -> dict:
        return {**super().settings(), "sampler": "roth"}

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        classes = rng.integers(0, len(self.classes), self.batch_size // self.k)
        return np.concatenate([self.members[c][rng.integers(0, len(self.members[c]), self.k)] for c in classes])


class EpochSampler(PKSampler):
    """A sampler whose batches come an epoch at a time; epochs may differ in length."""

    name = ""

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int,
                 small_classes: str = "repeat"):
        super().__init__(labels, batch_size, samples_per_class, seed, small_classes)
        self._starts = [0]           # the first step of each epoch known so far, and the end of the last
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def settings(self) -> dict:
        return {**super().settings(), "sampler": self.name}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        raise NotImplementedError

    def epoch_length(self, epoch: int) -> int:
        return len(self._batches(epoch))

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.epoch_batches(epoch))
        return self._cache[1]

    def epoch_start(self, epoch: int) -> int:
        while len(self._starts) <= epoch:
            length = self.epoch_length(len(self._starts) - 1)
            if not length:
                raise UserError(f"train.sampler={self.name}: an epoch has no batch of {self.batch_size} "
                                f"({len(self.classes)} classes, K = {self.k}); lower train.global_batch")
            self._starts.append(self._starts[-1] + length)
        return self._starts[epoch]

    def step_of(self, epoch: float) -> int:
        whole = math.floor(epoch)
        return self.epoch_start(whole) + round((epoch - whole) * self.epoch_length(whole))

    def epoch_of(self, step: int) -> int:
        while self._starts[-1] <= step:
            self.epoch_start(len(self._starts))
        return bisect.bisect_right(self._starts, step) - 1

    def describe(self, epochs: int | None) -> int | list[int]:
        """Steps per epoch: one number where every epoch has it, else the list over train.epochs."""
        lengths = [self.epoch_length(e) for e in range(epochs or 1)]
        return lengths[0] if len(set(lengths)) == 1 else lengths

    def batch(self, step: int) -> np.ndarray:
        epoch = self.epoch_of(step)
        return self._batches(epoch)[step - self._starts[epoch]]

    def _shuffled_members(self, rng: np.random.Generator) -> list[np.ndarray]:
        return [m[rng.permutation(len(m))] for m in self.members]


class RSkSampler(EpochSampler):
    name = "rsk"

    def _taken(self, order: np.ndarray) -> list[np.ndarray]:
        """The classes (positions in `order`) each batch takes a group from, batch by batch."""
        groups = self.batch_size // self.k
        left = np.array([len(self.members[c]) // self.k for c in order])
        taken = []
        while True:
            ready = np.flatnonzero(left > 0)[:groups]  # the first P classes in the order that still have a group
            if len(ready) < groups:
                return taken
            left[ready] -= 1
            taken.append(ready)

    def epoch_length(self, epoch: int) -> int:
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(len(self.classes))
        return len(self._taken(order))

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch, 2]).permutation(len(self.classes))
        rng = np.random.default_rng([self.seed, epoch, 3])
        members = self._shuffled_members(rng)
        used = np.zeros(len(order), dtype=int)
        batches = []
        for ready in self._taken(order):
            batch = [members[order[i]][used[i] * self.k:(used[i] + 1) * self.k] for i in ready]
            used[ready] += 1
            batches.append(np.concatenate(batch))
        return [batches[i] for i in rng.permutation(len(batches))]


class IBCSampler(EpochSampler):
    name = "ibc"

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int,
                 small_classes: str = "repeat", redraw: bool = False):
        super().__init__(labels, batch_size, samples_per_class, seed, small_classes)
        self.redraw = redraw
        self.divisors = [p for p in range(2, batch_size // 2 + 1) if batch_size % p == 0]
        if redraw and not self.divisors:
            raise UserError(f"train.redraw_pk: train.global_batch={batch_size} has no divisor in [2, {batch_size // 2}]")

    def settings(self) -> dict:
        return {**super().settings(), "redraw_pk": self.redraw}

    def shape(self, epoch: int) -> tuple[int, int]:
        """(P, K) of `epoch`'s batches."""
        if not self.redraw:
            return self.batch_size // self.k, self.k
        p = int(np.random.default_rng([self.seed, epoch, 2]).choice(self.divisors))
        return p, self.batch_size // p

    def epoch_length(self, epoch: int) -> int:
        p, k = self.shape(epoch)
        groups = sum(max(len(m), k) // k + 1 for m in self.members)
        return -(-groups // p)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        p, k = self.shape(epoch)
        rng = np.random.default_rng([self.seed, epoch, 3])
        groups = []
        for m in self._shuffled_members(rng):
            if len(m) < k:  # padded by repeats of its own images
                m = np.concatenate([m, rng.choice(m, k - len(m))])
            m = np.concatenate([m, rng.choice(m, (len(m) // k + 1) * k - len(m), replace=False)])
            groups += np.split(m, len(m) // k)
        groups = [groups[i] for i in rng.permutation(len(groups))]
        if len(groups) % p:
            if p - len(groups) % p > len(groups):
                raise UserError(f"train.sampler=ibc: {len(groups)} groups cannot fill a batch of {p} groups; "
                                "lower train.global_batch")
            groups += [groups[i] for i in rng.choice(len(groups), p - len(groups) % p, replace=False)]
        return [np.concatenate(groups[i:i + p]) for i in range(0, len(groups), p)]


def build_sampler(name: str, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int,
                  small_classes: str = "repeat", redraw_pk: bool = False):
    """(sampler, its epochs: FixedEpochs or the sampler itself) for train.sampler=name."""
    if name == "ibc":
        sampler = IBCSampler(labels, batch_size, samples_per_class, seed, small_classes, redraw_pk)
        return sampler, sampler
    if name == "rsk":
        sampler = RSkSampler(labels, batch_size, samples_per_class, seed, small_classes)
        return sampler, sampler
    cls = RothSampler if name == "roth" else PKSampler
    return cls(labels, batch_size, samples_per_class, seed, small_classes), FixedEpochs(max(1, len(labels) // batch_size))


