"""How the global batch is shared among processes: the arithmetic every launch must satisfy.

Checked by the preflight before anything runs, and again by the training loop for direct callers.
"""
from __future__ import annotations

from pipeline.config import TrainConfig
from pipeline.config.backends import TABLE
from pipeline.errors import UserError


def check_processes(parallel: str, processes: int) -> None:
    if processes > 1 and not TABLE[parallel].many_processes:
        many = "|".join(n for n, b in TABLE.items() if b.many_processes and not b.offloads_optimizer)
        raise UserError(f"{processes} processes were launched but parallel={parallel} trains in one; launch a single "
                        f"process or set parallel={many}")


def check_shares(t: TrainConfig, processes: int) -> None:
    """Each rank takes an equal, contiguous share of the global batch, cut into whole chunks, so that
    the chunks (and their drop-path masks) are those of a single process: the weights do not
    depend on the number of processes."""
    share = t.global_batch // processes
    if processes > 1 and (t.global_batch % processes or share % t.chunk_size):
        raise UserError(f"train.global_batch={t.global_batch} over {processes} processes must give each a multiple of "
                        f"train.chunk_size={t.chunk_size}; pick a global batch divisible by {processes * t.chunk_size}")
