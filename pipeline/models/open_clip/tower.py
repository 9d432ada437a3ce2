"""An open_clip image tower, built from the model's open_clip config with the user's shape overrides,
and the mapping of an open_clip checkpoint onto it (shared by the build and the preflight check).

Two kinds: open_clip's own VisionTransformer (`visual.transformer.resblocks`), and the towers it
builds with timm (`visual.trunk`: a timm ViT or EVA, its pooling, optionally `visual.head`'s
projection). open_clip does not hand the image size or the shape keys to timm, so they are given to
timm.create_model for the time of the build."""
from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import given


def model_config(cfg: ModelConfig) -> dict:
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.arch)
    if model_cfg is None:
        raise UserError(f"model.arch={cfg.arch} is not an open_clip model name (see open_clip.list_models())")
    return model_cfg


def is_timm(model_cfg: dict) -> bool:
    return bool(model_cfg["vision_cfg"].get("timm_model_name"))


def build_tower(cfg: ModelConfig) -> nn.Module:
    from open_clip.model import _build_vision_tower

    model_cfg = model_config(cfg)
    vision = {**model_cfg["vision_cfg"], "image_size": cfg.image_size}
    if is_timm(model_cfg):
        vision["timm_drop_path"] = cfg.drop_path
        context = _timm_arguments(img_size=cfg.image_size, **given(patch_size=cfg.patch_size, depth=cfg.depth,
                                                                   embed_dim=cfg.width, num_heads=cfg.heads))
    else:
        if vision.get("layers") is None or not isinstance(vision.get("layers"), int):
            raise UserError(f"open_clip {cfg.arch} has no ViT image tower (a ResNet or ConvNeXt tower); "
                            f"this project finetunes ViT towers")
        vision.update(given(patch_size=cfg.patch_size, layers=cfg.depth, width=cfg.width))
        if cfg.heads:
            vision["head_width"] = vision["width"] // cfg.heads
        context = contextlib.nullcontext()
    try:
        with context:
            return _build_vision_tower(model_cfg["embed_dim"], vision, quick_gelu=model_cfg.get("quick_gelu", False))
    except (AssertionError, TypeError) as e:  # the library's own checks of the shape keys
        raise UserError(f"open_clip {cfg.arch} cannot be built with these model keys ({e or 'a shape check failed'}); "
                        f"set model.width, model.heads and model.patch_size to values it takes") from None


@contextlib.contextmanager
def _timm_arguments(**kwargs):
    import timm

    with mock.patch.object(timm, "create_model", functools.partial(timm.create_model, **kwargs)):
        yield


def blocks_and_after(visual: nn.Module) -> tuple[nn.ModuleList, tuple[str, ...]]:
    if hasattr(visual, "trunk"):
        if not hasattr(visual.trunk, "blocks"):
            raise UserError(f"open_clip's timm tower {type(visual.trunk).__name__} has no transformer blocks; "
                            f"this project finetunes ViT towers")
        return visual.trunk.blocks, ("trunk.norm", "trunk.fc_norm", "trunk.attn_pool", "trunk.head", "head")
    return visual.transformer.resblocks, ("ln_post", "proj", "attn_pool")


def output_width(visual: nn.Module, embed_dim: int) -> int:
    """The tower's feature size: the CLIP embedding where a projection ends it, else the trunk's own."""
    if not hasattr(visual, "trunk") or len(visual.head):
        return embed_dim
    return visual.trunk.num_classes or visual.trunk.num_features


def unwrap(state: dict) -> dict:
    """open_clip's load_state_dict: a training checkpoint's 'state_dict', no 'module.' prefix."""
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def tower_state(state: dict, visual: nn.Module) -> dict:
    """A full CLIP checkpoint's image tower, named as in `visual`, with its position embeddings
    resampled to the tower's grid (open_clip's resize for its ViT, timm's filter for a timm trunk).
    Works on meta tensors too (the preflight's check)."""
    from open_clip.model import resize_pos_embed

    if not hasattr(visual, "trunk"):
        holder = nn.Module()
        holder.visual = visual
        state = dict(state)
        resize_pos_embed(state, holder)
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    if "pos_embed" in trunk and getattr(visual.trunk, "pos_embed", None) is not None \
            and trunk["pos_embed"].shape != visual.trunk.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(visual.trunk, "no_embed_class", False) else visual.trunk.num_prefix_tokens
        trunk["pos_embed"] = resample_abs_pos_embed(trunk["pos_embed"], new_size=visual.trunk.patch_embed.grid_size,
                                                    num_prefix_tokens=prefix)
    rest = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.") and not k.startswith("visual.trunk.")}
    return {**{"trunk." + k: v for k, v in trunk.items()}, **rest}
