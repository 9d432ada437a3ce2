"""Where a training step's time goes: named phases timed with a wall clock, summed until read.

    timer = PhaseTimer(device)
    with timer.phase("pass1"):
        ...
    timer.take()   # {"pass1": seconds, ...} since the last take, then zeroed

On a GPU the phases synchronise the device at their start and end, so a phase is charged for the
kernels it launched rather than for the ones still running from before (the cost: a few syncs per
step, where the step ends in one anyway). `NO_TIMER` times nothing and costs nothing.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


class PhaseTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def iterate(self, items: Iterable[T], name: str) -> Iterator[T]:
        """`items`, with the time spent waiting for each charged to `name` (e.g. the data loader)."""
        iterator = iter(items)
        while True:
            with self.phase(name):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last take."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


class _NoTimer:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


_END = object()
NO_TIMER = _NoTimer()
