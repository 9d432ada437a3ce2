"""The training scalars of each logging window (the steps since the last log line), all from the
step's own timers, so the log line, the trackers and the progress bar agree.

    train/loss         the global loss, mean over the window's steps
    train/lr           the schedule's current learning rate of the first parameter group (the
                       backbone's); train/lr/<i> that of group i (the head's, no-decay groups);
                       train/lr/loss that of the loss's own parameters, where it has some
    train/grad_norm    the global 2-norm of the gradients before clipping, mean over the window
    train/step_s       seconds per step: data + pass1 + loss + pass2 + optimizer + bookkeeping,
                       without validation and checkpoints
    train/images_per_s the global batch / train/step_s (all processes together)
    time/<phase>       seconds per step in each phase: data (waiting for the loader, and the copy
                       to the device), pass1, loss (with the gathers), pass2, optimizer (with clipping)
    mem/peak_gb        pipeline.models.accounting.peak_memory_gb, since the process started
    perf/mfu           (GPU) pipeline.models.accounting.mfu of the window's throughput
"""
from __future__ import annotations

import time

import torch

from pipeline.models import accounting
from pipeline.train.timing import PhaseTimer

PHASES = ("data", "pass1", "loss", "pass2", "optimizer")
EXCLUDED = ("validation", "checkpoint")  # timed, but not part of a step


class StepMetrics:
    def __init__(self, engine, global_batch: int, processes: int, loss_scheduler=None, flops_per_image: float = 0.0,
                 peak_flops: float = 0.0):
        self.engine, self.global_batch, self.processes = engine, global_batch, processes
        self.loss_scheduler = loss_scheduler
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops
        self.timer = PhaseTimer(engine.device)
        self._reset()

    def _reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.started = time.perf_counter()

    def step_done(self, loss: torch.Tensor) -> None:
        """After each step: kept as tensors, read (one sync) when the window is logged."""
        self.losses.append(loss.detach())
        self.norms.append(self.engine.grad_norm.detach())

    def take(self) -> dict[str, float]:
        """The window's scalars; starts the next window."""
        steps = len(self.losses)
        seconds = self.timer.take()
        wall = time.perf_counter() - self.started - sum(seconds.get(name, 0.0) for name in EXCLUDED)
        step_s = wall / steps
        lrs = self.engine.scheduler.get_last_lr()
        scalars = {"train/loss": torch.stack(self.losses).float().mean().item(),
                   "train/lr": lrs[0], **{f"train/lr/{i}": lr for i, lr in enumerate(lrs) if i},
                   "train/grad_norm": torch.stack([n.float().cpu() for n in self.norms]).mean().item(),
                   "train/step_s": step_s, "train/images_per_s": self.global_batch / step_s,
                   **{f"time/{name}": seconds.get(name, 0.0) / steps for name in PHASES},
                   "mem/peak_gb": accounting.peak_memory_gb(self.engine.device)}
        if self.loss_scheduler is not None:
            scalars["train/lr/loss"] = self.loss_scheduler.get_last_lr()[0]
        if self.flops_per_image and self.peak_flops:
            scalars["perf/mfu"] = accounting.mfu(self.flops_per_image, scalars["train/images_per_s"], self.processes,
                                                 self.peak_flops)
        self._reset()
        return scalars
