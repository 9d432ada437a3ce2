"""timm models (DINOv2, DINOv3, AIMv2, EVA-02...: any name timm.create_model knows).

Local weights: a timm checkpoint file, loaded by timm itself through
`pretrained_cfg_overlay=dict(file=...)`, so timm's own filters (position embedding resampling
for another image size, DINOv2's key names, DINOv3's released .pth layout) apply. timm reads it
with torch.load(weights_only=True); a file that needs pickle is refused unless
train.trust_checkpoint=true (pipeline/trust.py), and then read by timm's load_state_dict and
handed over as `state_dict=`. model.pretrained=hub:<tag>: timm's own pretrained weights
`<arch>.<tag>`, downloaded to (or, offline, read from) the Hugging Face cache.
"""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import Backbone, given, hub_name, pretrained_path
from pipeline.trust import pickle_allowed, refused

AFTER_BLOCKS = ("norm", "fc_norm", "attn_pool", "head")


def create_kwargs(cfg: ModelConfig) -> dict:
    """timm.create_model's arguments for the architecture (no weights): the user's shape overrides only."""
    return dict(num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path,
                **given(patch_size=cfg.patch_size, depth=cfg.depth, global_pool=cfg.global_pool, embed_dim=cfg.width,
                        num_heads=cfg.heads))


def model_name(cfg: ModelConfig) -> str:
    """model.arch, with hub:<tag> as timm's `<arch>.<tag>` (the tag may also be given in full)."""
    import timm

    tag = hub_name(cfg)
    if tag is None:
        return cfg.arch
    name = tag if tag.startswith(cfg.arch + ".") else f"{cfg.arch}.{tag}"
    if name not in timm.list_pretrained(cfg.arch + ".*"):
        known = [t.split(".", 1)[1] for t in timm.list_pretrained(cfg.arch + ".*")]
        raise UserError(f"model.pretrained={cfg.pretrained}: timm has no weights {name}; "
                        f"its tags for {cfg.arch}: {', '.join(known) or 'none'}")
    return name


def not_a_vit(cfg: ModelConfig) -> str:
    return (f"timm {cfg.arch} has no transformer blocks (model.blocks); this project finetunes ViT-like timm "
            f"models (ViT, DINOv2/v3, EVA, AIMv2, SigLIP...)")


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    import timm

    pretrained = {}
    if hub_name(cfg) is not None:
        pretrained = {"pretrained": True}
    elif cfg.pretrained:
        path = str(pretrained_path(cfg))
        weights = {"state_dict": timm.models.load_state_dict(path, weights_only=False)} if pickle_allowed() else {"file": path}
        pretrained = {"pretrained": True, "pretrained_cfg_overlay": weights}
    try:
        model = timm.create_model(model_name(cfg), **create_kwargs(cfg), **pretrained)
    except RuntimeError as e:
        if "weights_only=True blocked" in str(e):  # timm's refusal of a file that needs pickle
            raise refused(cfg.pretrained, "model.pretrained", e) from None
        if "Unknown model" in str(e):
            raise UserError(f"model.arch={cfg.arch} is not a timm model name (see timm.list_models())") from None
        raise
    except TypeError as e:  # a key the architecture does not take: a CNN has no img_size, some ViTs no depth
        if "img_size" in str(e):
            raise UserError(not_a_vit(cfg)) from None
        raise UserError(f"timm {cfg.arch} does not take these model keys ({e}); leave them unset") from None
    except AssertionError as e:  # timm's own checks, e.g. a width that the heads do not divide
        raise UserError(f"timm {cfg.arch} cannot be built with these model keys ({e or 'a shape check failed'}); "
                        f"set model.width, model.heads and model.patch_size to values it takes") from None
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks):
        raise UserError(not_a_vit(cfg))
    return Backbone(model, model.num_features, blocks, AFTER_BLOCKS, lambda: model.set_grad_checkpointing(True))
