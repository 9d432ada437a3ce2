"""What the runner resolves once and hands to every stage, to `train` and to the validator.

The world (rank, size), the device, the run directory (its shards' splits are read through it) and
the dataset's evaluation protocol: resolved from the environment and the config in one place
(pipeline/runner.py), never again inside a stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import protocols
from pipeline.config import Config
from pipeline.parallel.distributed import World, pick_device, world_from_env
from pipeline.protocols import Protocol
from pipeline.run_dir import RunDir


@dataclass(frozen=True)
class RunContext:
    world: World
    device: torch.device
    run: RunDir
    protocol: Protocol  # the dataset's queries and gallery, with eval.ks / eval.split / eval.gallery applied

    @classmethod
    def resolve(cls, cfg: Config, world: World | None = None, run_dir: str | Path | None = None) -> RunContext:
        """The runner's one resolution (also for tools and tests that call a stage directly)."""
        world = world_from_env() if world is None else world
        return cls(world, pick_device(cfg.device, world), RunDir(cfg.run_dir if run_dir is None else run_dir),
                   cfg.protocol())

    @property
    def splits(self) -> dict[str, dict]:
        """The shards' splits (shards/summary.json): name -> images, classes, shards, ..."""
        return self.run.splits()

    def checked_protocol(self) -> Protocol:
        """The protocol, after checking that the shards have every split it names."""
        protocols.check_splits(self.protocol, list(self.splits), str(self.run.shards))
        return self.protocol
