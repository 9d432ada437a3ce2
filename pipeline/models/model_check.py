"""The preflight's model check: the architecture can be built (on the meta device: no memory, no
weights) and model.pretrained fits it, names and shapes, before any stage runs; one line naming the
first problem."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import hub_name


def check_model(cfg: ModelConfig) -> None:
    from pipeline.models.encoders import build_encoder, exported_start, is_exported
    from pipeline.models.families import family

    builder = family(cfg)  # an unknown model.family is its own one-line error
    with torch.device("meta"):
        build_encoder(dataclasses.replace(cfg, pretrained=None), seed=0)
    if not cfg.pretrained:
        return
    path = Path(cfg.pretrained).expanduser()
    if hub_name(cfg) is None and not path.exists():
        raise UserError(f"model.pretrained={cfg.pretrained} does not exist; give the local {cfg.family} weights "
                        f"(or hub:<the library's pretrained tag or hub id>)")
    if hub_name(cfg) is None and is_exported(path):
        exported_start(cfg)  # this project's export: the architecture must be the same
        return
    builder.check_pretrained(cfg)
