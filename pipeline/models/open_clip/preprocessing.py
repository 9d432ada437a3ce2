"""An open_clip model's normalisation: its config's, else that of its pretrained weights (the tag of
model.pretrained=hub:<tag>, else the one all its tags share: SigLIP's and PE's 0.5, EVA's CLIP
values), else open_clip's default (OpenAI's)."""
from __future__ import annotations

from pipeline.config import ModelConfig
from pipeline.models.backbone import hub_name
from pipeline.models.open_clip.tower import model_config


def preprocessing(cfg: ModelConfig) -> tuple[list[float], list[float]]:
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg

    own = model_config(cfg).get("preprocess_cfg", {})
    if "mean" in own and "std" in own:
        return list(own["mean"]), list(own["std"])
    tag = hub_name(cfg)
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(cfg.arch)
    values = {(tuple(c["mean"]), tuple(c["std"])) for c in (get_pretrained_cfg(cfg.arch, t) for t in tags)
              if c.get("mean") and c.get("std")}
    if len(values) == 1:
        mean, std = values.pop()
        return list(mean), list(std)
    defaults = PreprocessCfg()
    return list(own.get("mean", defaults.mean)), list(own.get("std", defaults.std))
