"""The model families, one folder each (pipeline/models/<family>/): a new family is a folder and its presets."""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.errors import UserError


def families() -> dict:
    from pipeline.models import open_clip, timm, transformers
    return {"timm": timm, "open_clip": open_clip, "transformers": transformers}


def family(cfg: ModelConfig):
    if cfg.family not in families():
        raise UserError(f"model.family={cfg.family} is not supported; use one of {', '.join(families())}")
    return families()[cfg.family]
