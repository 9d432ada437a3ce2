"""Each training backend (`parallel=`) described once: what it keeps on every rank and what it shards.

The engines (pipeline/parallel/engine.py) are built from this table, and the config checks, the
precision, the preflight, the checkpoints and the plan read its facts instead of comparing names.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    many_processes: bool          # trains across processes (`none` is one process)
    shards_optimizer: bool        # optimizer state split over the ranks (ZeRO-1 and up, FSDP2)
    shards_gradients: bool        # gradients reduce-scattered into the owning rank's part (ZeRO-2 and up, FSDP2)
    gathers_weights: bool         # weights sharded, each block gathered for its forward and backward (ZeRO-3, FSDP2)
    deepspeed_stage: int | None   # DeepSpeed's ZeRO stage (ds_configs/<name>.json); None: not DeepSpeed
    offloads_optimizer: bool = False  # optimizer state in CPU memory (DeepSpeed's offload_optimizer)

    @property
    def deepspeed(self) -> bool:
        return self.deepspeed_stage is not None

    @property
    def replicated(self) -> bool:
        """Several processes, each with everything: gradients all-reduced in buckets (DDP)."""
        return self.many_processes and not self.shards_optimizer

    @property
    def holds_weights(self) -> bool:
        """Holds, gathers and communicates the weights itself: parallel.param_dtype applies."""
        return self.shards_optimizer

    @property
    def checkpoint_format(self) -> str:
        """dcp (torch.distributed.checkpoint: resharded on load by any dcp backend) or deepspeed (its own)."""
        return "deepspeed" if self.deepspeed else "dcp"


TABLE = {b.name: b for b in (
    Backend("none", False, False, False, False, None),
    Backend("ddp", True, False, False, False, None),
    Backend("zero1", True, True, False, False, 1),
    Backend("zero2", True, True, True, False, 2),
    Backend("zero3", True, True, True, True, 3),
    Backend("zero3_offload", True, True, True, True, 3, offloads_optimizer=True),
    Backend("fsdp2", True, True, True, True, None),
)}
NAMES = tuple(TABLE)  # parallel.name's choices
DEEPSPEED = tuple(n for n, b in TABLE.items() if b.deepspeed)


def backend(name: str) -> Backend:
    return TABLE[name]
