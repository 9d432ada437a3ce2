"""Seeds derived from tuples of integers, and blocks run under a fixed seed.

The two-pass step (per chunk) and the losses (per step) draw random numbers this way, so their
draws depend only on (seed, step, position), never on the global RNG or on the number of processes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from a tuple of integers (e.g. seed, step, chunk start, purpose tag)."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**62))


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under a fixed RNG state, leaving the global RNG as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield
