"""finetune: train the encoder (pipeline/train/loop.py); checkpoints every train.checkpoint_every steps.

Running it again resumes from the newest intact checkpoint. SIGUSR1, SIGTERM or $PIPELINE_STOP_FILE
stop it after a step, with a checkpoint and, under Slurm, a requeue (pipeline/parallel/preemption.py).
"""
from __future__ import annotations

from pipeline.config import Config
from pipeline.parallel import preemption
from pipeline.run_context import RunContext
from pipeline.train.loop import train

DISTRIBUTED = True  # every rank trains (the runner starts it on all of them)


def run(cfg: Config, ctx: RunContext) -> None:
    with preemption.StopRequest() as stop:
        train(cfg, ctx, stop)
