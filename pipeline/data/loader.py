"""Training batches: the P x K sampler's share for this rank, decoded and augmented in DataLoader workers.

Each sample's augmentation is seeded by (seed, step, position in the global batch), so the images
of a step do not depend on the number of workers or processes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from pipeline.data.sampler import PKSampler
from pipeline.data.shards import ShardIndex


class AugmentedImages(Dataset):
    """Indexed by (sample number, augmentation seed)."""

    def __init__(self, index: ShardIndex, transform: Callable):
        self.index, self.transform = index, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, seed = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone: torch.manual_seed would also queue a CUDA seeding call per sample
            torch.default_generator.manual_seed(seed)
            image = self.transform(self.index.image(i))
        return image, int(self.index.labels[i])


class StepBatches:
    """Batch sampler: for steps start..end-1, this rank's (index, seed) pairs."""

    def __init__(self, sampler: PKSampler, start: int, end: int, rank: int, world_size: int):
        self.sampler, self.start, self.end, self.rank, self.world = sampler, start, end, rank, world_size

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            indices, seeds = self.sampler.rank_slice(step, self.rank, self.world)
            yield [(int(i), int(s)) for i, s in zip(indices, seeds)]


class _PerBatchTail:
    """Iterate a DataLoader, applying `tail` to each batch of images on `device`: the (pinned) uint8
    batch is copied there without blocking, 4x less than its float version, and normalised there."""

    def __init__(self, loader: DataLoader, tail: Callable, device: torch.device | None = None):
        self.loader, self.tail, self.device = loader, tail, device or torch.device("cpu")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield self.tail(images.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)


def split_tail(transform: Callable) -> tuple[Callable, Callable | None]:
    """(per image, per batch): a Compose ending in ToDtype + Normalize is cut before them.

    Both are the same arithmetic on each pixel whether applied to one image or to a batch, so the
    batches are identical; the workers then hand over uint8 images (4x less through shared memory,
    no float copy per image), and the float conversion runs once per batch.
    """
    steps = getattr(transform, "transforms", None)
    if steps and len(steps) >= 3 and isinstance(steps[-1], T.Normalize) and isinstance(steps[-2], T.ToDtype):
        return T.Compose(steps[:-2]), T.Compose(steps[-2:])
    return transform, None


def train_loader(index: ShardIndex, transform: Callable, sampler: PKSampler, start: int, end: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0, worker_init_fn: Callable | None = None,
                 device: torch.device | None = None):
    """Steps start..end-1 of this rank: (images, labels) batches, decoded and augmented in `workers`
    processes; on `device` (default the CPU) when the float conversion is per batch (`split_tail`)."""
    per_image, per_batch = split_tail(transform)
    loader = DataLoader(AugmentedImages(index, per_image), batch_sampler=StepBatches(sampler, start, end, rank, world_size),
                        num_workers=workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=worker_init_fn)
    return loader if per_batch is None else _PerBatchTail(loader, per_batch, device)
