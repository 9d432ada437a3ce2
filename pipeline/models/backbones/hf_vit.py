"""transformers image models: `Dinov2Model` and `CLIPVisionModel` (model.arch).

Local weights: a `from_pretrained` folder (config.json + model.safetensors, as `save_pretrained`
writes it, e.g. a hub snapshot of facebook/dinov2-large). The output is the model's pooled
output (the layer-normed CLS token). The architecture is the folder's config with the user's
overrides; random init starts from the config class's defaults. model.drop_path applies to
Dinov2Model (drop_path_rate); CLIPVisionModel has no stochastic depth.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbones import Backbone, given, pretrained_path
from pipeline.trust import pickle_allowed, refused

# arch -> (model class, config class, blocks, layers after the blocks, default normalisation)
MODELS = {"Dinov2Model": ("Dinov2Model", "Dinov2Config", "encoder.layer", ("layernorm",), "IMAGENET_DEFAULT"),
          "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig", "encoder.layers", ("post_layernorm",),
                              "OPENAI_CLIP")}


class PooledOutput(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # CLIP's position embeddings are tied to the config's image size; other sizes interpolate.
        self.extra = {"interpolate_pos_encoding": True} if model.config.model_type == "clip_vision_model" else {}

    def forward(self, images):
        return self.model(pixel_values=images, **self.extra).pooler_output


def _checkpointing(model):
    """transformers >= 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)."""
    return getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable


def _spec(cfg: ModelConfig):
    if cfg.arch not in MODELS:
        raise UserError(f"model.arch={cfg.arch} is not a supported transformers model; use one of {', '.join(MODELS)}")
    return MODELS[cfg.arch]


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    import transformers

    model_name, config_name, blocks, after, _ = _spec(cfg)
    model_cls, config_cls = getattr(transformers, model_name), getattr(transformers, config_name)
    overrides = given(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                      patch_size=cfg.patch_size)
    if cfg.width and config_name == "CLIPVisionConfig":
        overrides["intermediate_size"] = 4 * cfg.width
    if config_name == "Dinov2Config":
        overrides["drop_path_rate"] = cfg.drop_path
    if saved_config is not None:  # an exported model: its own architecture, weights loaded after
        model = model_cls(config_cls.from_dict({**saved_config, **overrides}))
    elif cfg.pretrained:
        folder = pretrained_path(cfg, folder=True)
        try:  # .bin files: torch.load(weights_only=True) unless train.trust_checkpoint=true (pipeline/trust.py)
            trusted = _trusted_bin_weights(folder)
            if trusted is None:
                model = model_cls.from_pretrained(str(folder), **overrides)
            else:
                model = model_cls.from_pretrained(None, config=config_cls.from_pretrained(str(folder), **overrides),
                                                  state_dict=trusted)
        except pickle.UnpicklingError as e:
            raise refused(folder, "model.pretrained", e) from None
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"model.pretrained={cfg.pretrained}: {str(e).splitlines()[0]}") from None
    else:
        model = model_cls(config_cls(image_size=cfg.image_size, **overrides))
    _refuse_attention_dropout(model.config)
    if getattr(model.embeddings, "mask_token", None) is not None:
        model.embeddings.mask_token.requires_grad_(False)  # masked pretraining only: never used here (DDP would fail)
    module = PooledOutput(model)
    root = "model.vision_model." if hasattr(model, "vision_model") else "model."  # transformers < 5 nests CLIP
    return Backbone(module, model.config.hidden_size, module.get_submodule(root + blocks),
                    tuple(root + name for name in after),
                    lambda: _checkpointing(model)({"use_reentrant": False}),
                    saved_config=model.config.to_dict())


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


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    """The folder's image processor values (preprocessor_config.json), else the family's defaults."""
    import transformers.image_utils as constants

    default = _spec(cfg)[4]
    mean, std = getattr(constants, f"{default}_MEAN"), getattr(constants, f"{default}_STD")
    if cfg.pretrained:
        processor = pretrained_path(cfg, folder=True) / "preprocessor_config.json"
        if processor.is_file():
            values = json.loads(processor.read_text())
            mean, std = values.get("image_mean", mean), values.get("image_std", std)
    return list(mean), list(std)
