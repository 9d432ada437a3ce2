"""A timm model's normalisation: that of its pretrained weights (the tag of model.pretrained=hub:<tag>,
else the architecture's default tag), ImageNet's for a name without weights."""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.models.backbone import hub_name


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    tag = hub_name(cfg)
    name = cfg.arch if tag is None else (tag if tag.startswith(cfg.arch + ".") else f"{cfg.arch}.{tag}")
    pretrained = timm.get_pretrained_cfg(name)
    if pretrained is None:
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    return list(pretrained.mean), list(pretrained.std)
