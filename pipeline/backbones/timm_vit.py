"""timm ViTs (DINOv2 included: vit_large_patch14_dinov2, vit_giant_patch14_dinov2, ...).

Local weights: a timm checkpoint file, loaded by timm itself through
`pretrained_cfg_overlay=dict(file=...)`, so timm's own filters (position embedding resampling
for another image size, DINOv2's key names) apply.
"""
from __future__ import annotations

from pipeline.backbones import Backbone, given, pretrained_path
from pipeline.config import ModelConfig


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    import timm

    overrides = given(patch_size=cfg.patch_size, depth=cfg.depth, global_pool=cfg.global_pool, embed_dim=cfg.width,
                      num_heads=cfg.heads)
    pretrained = {}
    if cfg.pretrained:
        pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pretrained_path(cfg))}}
    model = timm.create_model(cfg.arch, num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path,
                              **overrides, **pretrained)
    return Backbone(model, model.num_features, model.blocks, ("norm", "fc_norm", "attn_pool", "head"),
                    lambda: model.set_grad_checkpointing(True))


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    pretrained = timm.get_pretrained_cfg(cfg.arch)
    if pretrained is None:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    return list(pretrained.mean), list(pretrained.std)
