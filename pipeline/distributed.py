"""Who am I: rank, world size and local device, from torchrun / accelerate (RANK, WORLD_SIZE,
LOCAL_RANK) or from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


def world_from_env(env=os.environ) -> World:
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()


def pick_device(name: str, world: World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no GPU is visible; use device=cpu or device=auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", world.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")
