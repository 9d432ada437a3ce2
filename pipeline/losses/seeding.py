"""Randomness inside a loss (SiMix's alphas, miners' sampling, rho's switches) as a function of (seed, step).

Every rank computes the loss over the same gathered global batch, so every rank must draw the same
numbers, and the one-pass and two-pass steps must too: no loss may touch the global RNG state.
The finetune stage calls `set_step(loss_fn, step)` before each step.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pipeline.rng import derive_seed, seeded_rng


class StepSeeded:
    """Mixin for modules that draw random numbers: `generator()` and `rng()` depend on (seed, step) only."""

    seed: int = 0
    step: int = 0

    def step_seed(self, salt: int = 0) -> int:
        return derive_seed(self.seed, self.step, salt, 3)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator (the same numbers on every device type); move what it draws."""
        return torch.Generator().manual_seed(self.step_seed(salt))

    def rng(self, device: torch.device, salt: int = 0) -> contextlib.AbstractContextManager:
        """Run library code that draws from the global RNG (e.g. torch.multinomial in a miner)
        under a seed of (seed, step), leaving the global state as it was."""
        return seeded_rng(self.step_seed(salt), device)


def set_step(loss_fn: nn.Module, step: int) -> None:
    """Tell every seeded part of a loss which training step it is in."""
    for module in loss_fn.modules():
        if isinstance(module, StepSeeded):
            module.step = step
