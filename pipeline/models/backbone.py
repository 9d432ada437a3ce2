"""What every family builds: a Backbone (images -> feature vectors, its blocks, what follows them),
and the helpers the families share to read model.pretrained.

A family is a folder pipeline/models/<family>/ (timm, open_clip, transformers) whose package has
`build(cfg, saved_config=None) -> Backbone`, `preprocessing(cfg) -> (mean, std)` (the normalisation
the weights were trained with, found without building the model) and `check_pretrained(cfg)` (the
preflight's rule: model.pretrained is in the family's format and its names and shapes fit the
architecture, read without loading the weights).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError

HUB = "hub:"  # model.pretrained=hub:<tag or hub id>: the library's own download and cache


@dataclass
class Backbone:
    module: nn.Module               # images (B, 3, H, W) -> features (B, width)
    width: int
    blocks: nn.ModuleList           # the transformer blocks, in order (for model.trainable_blocks)
    after_blocks: tuple[str, ...]   # names (prefixes in `module`) of the layers after the blocks
    set_grad_checkpointing: Callable[[], None]
    saved_config: dict | None = None  # what rebuilds the architecture without the weights (transformers)


def hub_name(cfg: ModelConfig) -> str | None:
    """model.pretrained=hub:NAME: NAME (a timm or open_clip pretrained tag, a transformers hub id); else None."""
    if cfg.pretrained and cfg.pretrained.startswith(HUB):
        name = cfg.pretrained[len(HUB):]
        if not name:
            raise UserError(f"model.pretrained={cfg.pretrained} names nothing; give hub:<the library's tag or hub id>")
        return name
    return None


def pretrained_path(cfg: ModelConfig, folder: bool = False) -> Path:
    path = Path(cfg.pretrained).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        kind = "a from_pretrained folder (config.json + weights)" if folder else f"a local {cfg.family} weights file"
        raise UserError(f"model.pretrained={cfg.pretrained} does not exist; give {kind} "
                        f"(or {HUB}<the library's pretrained tag or hub id>)")
    return path


def given(**values) -> dict:
    """The overrides the user set (None means: the architecture's own)."""
    return {k: v for k, v in values.items() if v is not None}
