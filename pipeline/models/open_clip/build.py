"""open_clip image towers: any open_clip model name (ViT-L-14, ViT-g-14, ViT-L-14-quickgelu, and the
timm-backed ViT-SO400M-14-SigLIP2, PE-Core-L-14-336, EVA02-L-14, ...).

Only the image tower is built, from the model's open_clip config. Local weights: a full CLIP
checkpoint as open_clip saves it (`.bin`/`.pt` or `.safetensors`, read by open_clip's own
`load_state_dict`); its `visual.*` tensors are loaded strictly (after resampling the position
embeddings for another image size) and the text tower's are never built. model.pretrained=hub:<tag>:
open_clip's own pretrained weights (`open_clip.list_pretrained_tags_by_model(arch)`), downloaded by
open_clip to (or, offline, read from) the Hugging Face cache. The output is the tower's embedding
(the CLIP embedding space; SigLIP's attention-pooled features). model.drop_path applies to the timm
towers; open_clip's own ViT has no stochastic depth.
"""
from __future__ import annotations

import pickle

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.models.backbone import Backbone
from pipeline.models.open_clip.pretrained import weights_file
from pipeline.models.open_clip.tower import blocks_and_after, build_tower, model_config, output_width, tower_state
from pipeline.trust import pickle_allowed, refused


def build(cfg: ModelConfig, saved_config: dict | None = None) -> Backbone:
    from open_clip.factory import load_state_dict

    model_cfg = model_config(cfg)
    visual = build_tower(cfg)
    if cfg.pretrained:
        path = weights_file(cfg)
        try:  # torch.load(weights_only=True) unless train.trust_checkpoint=true (pipeline/trust.py)
            state = load_state_dict(str(path), weights_only=not pickle_allowed())
        except pickle.UnpicklingError as e:
            raise refused(cfg.pretrained, "model.pretrained", e) from None
        try:
            visual.load_state_dict(tower_state(state, visual))
        except RuntimeError as e:
            raise UserError(f"model.pretrained={cfg.pretrained} does not fit open_clip {cfg.arch} "
                            f"({str(e).splitlines()[1].strip()})") from None
    blocks, after = blocks_and_after(visual)
    return Backbone(visual, output_width(visual, model_cfg["embed_dim"]), blocks, after,
                    lambda: visual.set_grad_checkpointing(True))
