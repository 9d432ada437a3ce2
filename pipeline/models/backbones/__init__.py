"""Vision backbones, one file per library: each builds a module mapping images to feature vectors,
from random weights or from local weights in the library's own format.

A family module has `build(cfg, saved_config=None) -> Backbone` and `preprocessing(cfg) -> (mean, std)`
(the normalisation the weights were trained with, found without building the model).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError


@dataclass
class Backbone:
    module: nn.Module               # images (B, 3, H, W) -> features (B, width)
    width: int
    blocks: nn.ModuleList           # the transformer blocks, in order (for model.trainable_blocks)
    after_blocks: tuple[str, ...]   # names (prefixes in `module`) of the layers after the blocks
    set_grad_checkpointing: Callable[[], None]
    saved_config: dict | None = None  # what rebuilds the architecture without the weights (transformers)


def families() -> dict:
    from pipeline.models.backbones import hf_vit, open_clip_vit, timm_vit
    return {"timm": timm_vit, "open_clip": open_clip_vit, "transformers": hf_vit}


def family(cfg: ModelConfig):
    if cfg.family not in families():
        raise UserError(f"model.family={cfg.family} is not supported; use one of {', '.join(families())}")
    return families()[cfg.family]


def pretrained_path(cfg: ModelConfig, folder: bool = False) -> Path:
    path = Path(cfg.pretrained).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        kind = "a from_pretrained folder (config.json + weights)" if folder else f"a local {cfg.family} weights file"
        raise UserError(f"model.pretrained={cfg.pretrained} does not exist; give {kind}")
    return path


def given(**values) -> dict:
    """The overrides the user set (None means: the architecture's own)."""
    return {k: v for k, v in values.items() if v is not None}
