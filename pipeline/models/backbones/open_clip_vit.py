"""open_clip image towers: any open_clip model name (ViT-L-14, ViT-g-14, ViT-L-14-quickgelu, ...).

Only the image tower is built, from the model's open_clip config. Local weights: a full CLIP
checkpoint as open_clip saves it (`.bin`/`.pt` or `.safetensors`, read by open_clip's own
`load_state_dict`); its `visual.*` tensors are loaded strictly (after open_clip's position
embedding resize for another image size) and the text tower's are never built. The output is
the tower's projected embedding (the CLIP embedding space). open_clip's ViT has no stochastic
depth, so model.drop_path does not apply.
"""
from __future__ import annotations

import pickle

from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbones import Backbone, given, pretrained_path
from pipeline.trust import pickle_allowed, refused


def _model_config(cfg: ModelConfig) -> dict:
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.arch)
    if model_cfg is None:
        raise UserError(f"model.arch={cfg.arch} is not an open_clip model name (see open_clip.list_models())")
    return model_cfg


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    from open_clip.factory import load_state_dict
    from open_clip.model import _build_vision_tower, resize_pos_embed

    model_cfg = _model_config(cfg)
    vision = {**model_cfg["vision_cfg"], "image_size": cfg.image_size,
              **given(patch_size=cfg.patch_size, layers=cfg.depth, width=cfg.width)}
    if cfg.heads:
        vision["head_width"] = vision["width"] // cfg.heads
    visual = _build_vision_tower(model_cfg["embed_dim"], vision, quick_gelu=model_cfg.get("quick_gelu", False))
    if cfg.pretrained:
        try:  # torch.load(weights_only=True) unless train.trust_checkpoint=true (pipeline/trust.py)
            state = load_state_dict(str(pretrained_path(cfg)), weights_only=not pickle_allowed())
        except pickle.UnpicklingError as e:
            raise refused(cfg.pretrained, "model.pretrained", e) from None
        holder = nn.Module()
        holder.visual = visual
        resize_pos_embed(state, holder)
        try:
            visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
        except RuntimeError as e:
            raise UserError(f"model.pretrained={cfg.pretrained} does not fit open_clip {cfg.arch} "
                            f"({str(e).splitlines()[1].strip()})") from None
    return Backbone(visual, model_cfg["embed_dim"], visual.transformer.resblocks, ("ln_post", "proj", "attn_pool"),
                    lambda: visual.set_grad_checkpointing(True))


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    from open_clip.transform import PreprocessCfg

    own = _model_config(cfg).get("preprocess_cfg", {})
    defaults = PreprocessCfg()
    return list(own.get("mean", defaults.mean)), list(own.get("std", defaults.std))
