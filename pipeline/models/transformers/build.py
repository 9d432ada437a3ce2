"""transformers image models (model.arch, pipeline/models/transformers/models.py): Dinov2Model,
DINOv3ViTModel, CLIPVisionModel, Siglip2VisionModel, Aimv2VisionModel.

Local weights: a `from_pretrained` folder (config.json + model.safetensors, as `save_pretrained`
writes it, e.g. a hub snapshot of facebook/dinov3-vitl16-pretrain-lvd1689m; a full SigLIP 2 or AIMv2
model's folder gives its vision tower). model.pretrained=hub:<org/name>: that hub id, downloaded by
transformers to (or, offline, read from) the Hugging Face cache. The architecture is the folder's
config with the user's overrides; random init starts from the config class's defaults.
model.drop_path applies where the config has drop_path_rate (DINOv2, DINOv3).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import Backbone, hub_name, pretrained_path
from pipeline.models.transformers.loading import loading_problem
from pipeline.models.transformers.models import PooledOutput, config_overrides, random_config, spec
from pipeline.trust import pickle_allowed, refused


def source(cfg: ModelConfig) -> str:
    """What from_pretrained reads: the local folder, or the hub id of hub:<org/name>."""
    return hub_name(cfg) or str(pretrained_path(cfg, folder=True))


def classes(cfg: ModelConfig):
    import transformers

    s = spec(cfg)
    return s, getattr(transformers, s.model), getattr(transformers, s.config)


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    s, model_cls, config_cls = classes(cfg)
    overrides = config_overrides(cfg, s)
    if saved_config is not None:  # an exported model: its own architecture, weights loaded after
        model = model_cls(config_cls.from_dict({**saved_config, **overrides}))
    elif cfg.pretrained:
        model = _from_pretrained(cfg, model_cls, config_cls, overrides)
    else:
        model = model_cls(random_config(cfg, s, config_cls, overrides))
    _refuse_attention_dropout(model.config)
    for name, param in model.named_parameters():
        if name.endswith("mask_token"):
            param.requires_grad_(False)  # masked pretraining only: never used here (DDP would fail)
    module = PooledOutput(model)
    root = "model.vision_model." if hasattr(model, "vision_model") else "model."  # transformers < 5 nests CLIP
    return Backbone(module, model.config.hidden_size, module.get_submodule(root + s.blocks),
                    tuple(root + name for name in s.after),
                    lambda: _checkpointing(model)({"use_reentrant": False}),
                    saved_config=model.config.to_dict())


def _from_pretrained(cfg: ModelConfig, model_cls, config_cls, overrides: dict):
    where = source(cfg)
    try:  # .bin files: torch.load(weights_only=True) unless train.trust_checkpoint=true (pipeline/trust.py)
        trusted = _trusted_bin_weights(Path(where)) if hub_name(cfg) is None else None
        if trusted is None:
            model, info = model_cls.from_pretrained(where, output_loading_info=True, **overrides)
        else:
            model, info = model_cls.from_pretrained(None, config=config_cls.from_pretrained(where, **overrides),
                                                    state_dict=trusted, output_loading_info=True)
    except pickle.UnpicklingError as e:
        raise refused(where, "model.pretrained", e) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"model.pretrained={cfg.pretrained}: {str(e).splitlines()[0]}") from None
    problem = loading_problem(info)
    if problem:  # transformers would leave it at random, with a warning only
        raise UserError(f"model.pretrained={cfg.pretrained} does not fit transformers {cfg.arch}: {problem}")
    return model


def _checkpointing(model):
    """transformers >= 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)."""
    return getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable


def _refuse_attention_dropout(config) -> None:
    """Attention dropout may run in another attention kernel with gradients than without (pass 1 and
    pass 2 of the two-pass step), whose masks differ even under one seed; timm and open_clip ViTs are
    built without it, a transformers config.json may ask for it."""
    for key in ("attention_probs_dropout_prob", "attention_dropout"):
        p = getattr(config, key, 0.0) or 0.0
        if p > 0:
            raise UserError(f"the model's config sets {key}={p}: attention dropout draws different masks in the two "
                            f"passes of the two-pass step; set it to 0 in the config.json")


def _trusted_bin_weights(folder: Path) -> dict | None:
    """With train.trust_checkpoint=true, a folder's .bin weights read with pickle, to be handed over as
    `state_dict=` (transformers 5.23 reads .bin files with weights_only=True whatever it is told);
    None otherwise, or when the folder has safetensors weights (which need no pickle)."""
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not pickle_allowed() or not files or list(folder.glob("*.safetensors")):
        return None
    loaded = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    return {k: v for state in loaded for k, v in state.items() if torch.is_tensor(v)}
