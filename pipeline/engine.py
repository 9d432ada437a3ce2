"""One interface over the training backends: forward precision, backward, gradient sync, step.

The two-pass step talks only to this interface. Backend differences live here and nowhere else;
this issue has the single-process backend (`parallel=none`); DDP, ZeRO and FSDP2 add classes
with the same four methods.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on GPU; full fp32 on CPU, where bf16 is slow and inexact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Engine:
    """Single process, one device."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device):
        self.model, self.optimizer, self.scheduler, self.device = model, optimizer, scheduler, device

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device)

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Backward passes inside with enabled=False accumulate without communication."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
