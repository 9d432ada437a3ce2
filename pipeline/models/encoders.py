"""Encoders: a backbone (timm, open_clip or transformers; one folder each, pipeline/models/<family>/) plus an
embedding head, L2-normalised output, with the freezing policy and activation checkpointing.

`build_encoder(cfg, seed)` gives the same weights for the same seed and config, so the frozen
baseline of the embed stage and the starting point of the finetune stage are one model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models import lora
from pipeline.models.backbone import Backbone, hub_name
from pipeline.models.families import family


class Embedder(nn.Module):
    """backbone -> [LayerNorm] -> Linear(embed_dim) -> L2 normalisation.

    unnormalized_in_training: in training mode, return the head's output before the normalisation,
    for a loss that needs it (loss=mpn; the finetune stage sets it); eval mode always normalises."""

    unnormalized_in_training = False

    def __init__(self, backbone: nn.Module, width: int, embed_dim: int, head_norm: bool):
        super().__init__()
        self.backbone = backbone
        self.dim = embed_dim or width  # the size of an embedding
        if embed_dim:
            self.head = nn.Sequential(nn.LayerNorm(width) if head_norm else nn.Identity(), nn.Linear(width, embed_dim))
        else:
            self.head = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.head(self.backbone(images)).float()
        return features if self.training and self.unnormalized_in_training else F.normalize(features, dim=-1)


# The settings that decide the parameters' names and shapes: a checkpoint fits a model iff these match.
ARCHITECTURE = ("family", "arch", "image_size", "patch_size", "depth", "width", "heads", "global_pool", "embed_dim",
                "head_norm")


def architecture(cfg: ModelConfig) -> dict:
    """Plus model.lora's settings where LoRA is on (its parameters' names; a plain checkpoint stays as it was)."""
    lora = {"lora": dataclasses.asdict(cfg.lora)} if cfg.lora.rank else {}
    return {k: getattr(cfg, k) for k in ARCHITECTURE} | lora


def freeze(backbone: Backbone, trainable_blocks: int) -> None:
    """model.trainable_blocks = N >= 0: only the last N blocks and the layers after them train (N = 0:
    none of the backbone); -1: everything trains. The embedding head always trains."""
    if trainable_blocks < 0:
        return
    if trainable_blocks > len(backbone.blocks):
        raise UserError(f"model.trainable_blocks={trainable_blocks} but the backbone has {len(backbone.blocks)} blocks")
    backbone.module.requires_grad_(False)
    if trainable_blocks:
        for block in backbone.blocks[len(backbone.blocks) - trainable_blocks:]:
            block.requires_grad_(True)
        for name, param in backbone.module.named_parameters():
            if any(name == p or name.startswith(p + ".") for p in backbone.after_blocks):
                param.requires_grad_(True)


def build_encoder(cfg: ModelConfig, seed: int, saved_config: dict | None = None) -> Embedder:
    """`saved_config`: the backbone config stored by `export` (transformers models), for `load_exported`.
    A `model.pretrained` folder that this project exported starts the whole encoder, head included,
    from that export (`exported_start`)."""
    builder = family(cfg)
    start = exported_start(cfg)
    if start is not None:
        saved = start / "backbone_config.json"
        cfg = dataclasses.replace(cfg, pretrained=None)
        saved_config = json.loads(saved.read_text()) if saved.is_file() else saved_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random-init weights (the tiny preset, the head) depend on the seed only
        backbone = builder.build(cfg, saved_config)
        model = Embedder(backbone.module, backbone.width, cfg.embed_dim, cfg.head_norm)
    if start is not None:
        model.load_state_dict(load_file(str(start / "model.safetensors")))
    freeze(backbone, cfg.trainable_blocks)
    lora.apply(model, backbone.blocks, cfg, seed)  # model.lora.rank > 0: peft's adapters, the base frozen
    if cfg.grad_checkpointing:
        backbone.set_grad_checkpointing()
    model.saved_config = backbone.saved_config
    model.after_blocks = backbone.after_blocks  # the layers after the blocks, for train.layer_decay
    return model


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    """(mean, std): model.mean/model.std where set, else the values the model's weights were trained with
    (an exported start: those its config.json records)."""
    if cfg.mean is not None and cfg.std is not None:
        return list(cfg.mean), list(cfg.std)
    start = exported_start(cfg)
    if start is not None:
        saved = json.loads((start / "config.json").read_text())
        return list(saved["mean"]), list(saved["std"])
    return family(cfg).preprocessing(cfg)


def is_exported(path: Path) -> bool:
    """A folder written by `export`: model.safetensors and a config.json of this project's model keys
    (a transformers save_pretrained folder has both files too, with its own config)."""
    if not ((path / "model.safetensors").is_file() and (path / "config.json").is_file()):
        return False
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and all(k in saved for k in ARCHITECTURE)


def exported_start(cfg: ModelConfig) -> Path | None:
    """model.pretrained as a folder written by stage=export (e.g. an encoder pretrained on other classes,
    or a finetuned one to finetune further): the folder, checked to hold this very architecture; None
    for weights in a library's own format."""
    if not cfg.pretrained or hub_name(cfg) is not None or not is_exported(Path(cfg.pretrained).expanduser()):
        return None
    folder = Path(cfg.pretrained).expanduser()
    saved = json.loads((folder / "config.json").read_text())
    differ = [f"{k}={saved.get(k)}" for k in ARCHITECTURE if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"model.pretrained={cfg.pretrained} is an exported encoder with {', '.join(differ)}; "
                        f"set those model keys to the same values (or start from another export)")
    return folder


def _usual_mode(path: Path) -> None:
    """safetensors writes its file private (0600, a renamed temporary file): give it the mode of the other
    files the export writes, 0666 less the umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def export(model: nn.Module, cfg: ModelConfig, out: Path) -> None:
    """`model.safetensors` (backbone + head) + `config.json` (the model config, with its normalisation
    resolved) + for transformers models `backbone_config.json`: all that rebuilds the encoder."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _usual_mode(out / "model.safetensors")
    mean, std = preprocessing(cfg)
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(cfg), "mean": mean, "std": std}, indent=2))
    if getattr(model, "saved_config", None) is not None:
        (out / "backbone_config.json").write_text(json.dumps(model.saved_config, indent=2))


def exported_config(folder: Path | str) -> ModelConfig:
    """An export's model config (config.json may hold more: the ONNX file's preprocessing, say)."""
    saved = json.loads((Path(folder) / "config.json").read_text())
    return ModelConfig.from_dict({k: v for k, v in saved.items() if k != "lora"})  # an export is a plain model (lora.py)


def load_exported(folder: Path | str) -> Embedder:
    """Rebuild an exported encoder with plain torch and the family's own library: no pretrained
    weights, no distributed machinery needed."""
    folder = Path(folder)
    cfg = exported_config(folder)
    cfg.pretrained, cfg.drop_path, cfg.grad_checkpointing, cfg.trainable_blocks = None, 0.0, False, -1
    saved = folder / "backbone_config.json"
    model = build_encoder(cfg, seed=0, saved_config=json.loads(saved.read_text()) if saved.is_file() else None)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()
