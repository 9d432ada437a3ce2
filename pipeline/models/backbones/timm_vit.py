"""timm ViTs (DINOv2 included: vit_large_patch14_dinov2, vit_giant_patch14_dinov2, ...).

Local weights: a timm checkpoint file, loaded by timm itself through
`pretrained_cfg_overlay=dict(file=...)`, so timm's own filters (position embedding resampling
for another image size, DINOv2's key names) apply. timm reads it with torch.load(weights_only=True);
a file that needs pickle is refused unless train.trust_checkpoint=true (pipeline/trust.py), and then
read by timm's load_state_dict and handed over as `state_dict=`.
"""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.models.backbones import Backbone, given, pretrained_path
from pipeline.trust import pickle_allowed, refused


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    import timm

    overrides = given(patch_size=cfg.patch_size, depth=cfg.depth, global_pool=cfg.global_pool, embed_dim=cfg.width,
                      num_heads=cfg.heads)
    pretrained = {}
    if cfg.pretrained:
        path = str(pretrained_path(cfg))
        weights = {"state_dict": timm.models.load_state_dict(path, weights_only=False)} if pickle_allowed() else {"file": path}
        pretrained = {"pretrained": True, "pretrained_cfg_overlay": weights}
    try:
        model = timm.create_model(cfg.arch, num_classes=0, img_size=cfg.image_size, drop_path_rate=cfg.drop_path,
                                  **overrides, **pretrained)
    except RuntimeError as e:
        if "weights_only=True blocked" in str(e):  # timm's refusal of a file that needs pickle
            raise refused(cfg.pretrained, "model.pretrained", e) from None
        raise
    return Backbone(model, model.num_features, model.blocks, ("norm", "fc_norm", "attn_pool", "head"),
                    lambda: model.set_grad_checkpointing(True))


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    pretrained = timm.get_pretrained_cfg(cfg.arch)
    if pretrained is None:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    return list(pretrained.mean), list(pretrained.std)
