"""Encoders: a backbone (timm for now) plus an embedding head, L2-normalised output.

`build_encoder(cfg, seed)` gives the same weights for the same seed and config, so the frozen
baseline of the embed stage and the starting point of the finetune stage are one model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError


class Embedder(nn.Module):
    """backbone -> [LayerNorm] -> Linear(embed_dim) -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, width: int, embed_dim: int, head_norm: bool):
        super().__init__()
        self.backbone = backbone
        if embed_dim:
            self.head = nn.Sequential(nn.LayerNorm(width) if head_norm else nn.Identity(), nn.Linear(width, embed_dim))
        else:
            self.head = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)).float(), dim=-1)


def _timm_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    import timm

    overrides = {k: v for k, v in {"patch_size": cfg.patch_size, "depth": cfg.depth, "global_pool": cfg.global_pool}.items()
                 if v is not None}
    pretrained = {}
    if cfg.pretrained:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained={cfg.pretrained} does not exist; give a local timm weights file")
        pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    model = timm.create_model(cfg.arch, num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path,
                              **overrides, **pretrained)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, model.num_features


BACKBONES = {"timm": _timm_backbone}

# The settings that decide the parameters' names and shapes: a checkpoint fits a model iff these match.
ARCHITECTURE = ("family", "arch", "image_size", "patch_size", "depth", "global_pool", "embed_dim", "head_norm")


def architecture(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in ARCHITECTURE}


def build_encoder(cfg: ModelConfig, seed: int) -> Embedder:
    if cfg.family not in BACKBONES:
        raise UserError(f"model.family={cfg.family} is not supported yet; available: {', '.join(BACKBONES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random-init weights (the tiny preset, the head) depend on the seed only
        backbone, width = BACKBONES[cfg.family](cfg)
        return Embedder(backbone, width, cfg.embed_dim, cfg.head_norm)


def export(model: nn.Module, cfg: ModelConfig, out: Path) -> None:
    """`model.safetensors` + `config.json` (the model config that rebuilds the architecture)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))


def load_exported(folder: Path | str) -> Embedder:
    """Rebuild an exported encoder with plain torch + timm: no distributed machinery needed."""
    folder = Path(folder)
    cfg = ModelConfig(**json.loads((folder / "config.json").read_text()))
    cfg.pretrained, cfg.drop_path, cfg.grad_checkpointing = None, 0.0, False
    model = build_encoder(cfg, seed=0)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
