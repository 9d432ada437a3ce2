"""The transformers image models this project builds (model.arch), and how each is called.

Each takes images (B, 3, H, W) and gives its pooled output: DINOv2's and DINOv3's layer-normed class
token (DINOv3's register tokens left out), CLIP's post-layernormed class token, SigLIP 2's and AIMv2's
attention-pooling head. SigLIP 2 is a NaFlex model: it takes patches, a mask and each image's patch
grid, which `siglip2_inputs` makes from the images as Siglip2ImageProcessor would (row-major patches,
each flattened as (patch, patch, channel)); its learned position embeddings are resized to the grid."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import UserError


@dataclass(frozen=True)
class Spec:
    model: str                # transformers class
    config: str               # its config class
    blocks: str               # the transformer blocks, under the model
    after: tuple[str, ...]    # the layers after the blocks
    normalisation: str        # transformers.image_utils constants: the default mean/std
    model_types: tuple[str, ...]  # config.json model_type values whose weights the class loads
    drop_path: bool = False   # the config has drop_path_rate


MODELS = {
    "Dinov2Model": Spec("Dinov2Model", "Dinov2Config", "encoder.layer", ("layernorm",), "IMAGENET_DEFAULT",
                        ("dinov2",), drop_path=True),
    "CLIPVisionModel": Spec("CLIPVisionModel", "CLIPVisionConfig", "encoder.layers", ("post_layernorm",),
                            "OPENAI_CLIP", ("clip", "clip_vision_model")),
    "DINOv3ViTModel": Spec("DINOv3ViTModel", "DINOv3ViTConfig", "model.layer", ("norm",), "IMAGENET_DEFAULT",
                           ("dinov3_vit",), drop_path=True),
    "Siglip2VisionModel": Spec("Siglip2VisionModel", "Siglip2VisionConfig", "encoder.layers",
                               ("post_layernorm", "head"), "IMAGENET_STANDARD", ("siglip2", "siglip2_vision_model")),
    "Aimv2VisionModel": Spec("Aimv2VisionModel", "Aimv2VisionConfig", "encoder.layers", ("rms_norm", "head"),
                             "OPENAI_CLIP", ("aimv2", "aimv2_vision_model")),
}


def spec(cfg: ModelConfig) -> Spec:
    if cfg.arch not in MODELS:
        raise UserError(f"model.arch={cfg.arch} is not a supported transformers model; use one of {', '.join(MODELS)} "
                        f"(the weights' hub id goes in model.pretrained=hub:<org/name>)")
    return MODELS[cfg.arch]


def config_overrides(cfg: ModelConfig, spec: Spec) -> dict:
    """The user's shape keys as the config's names (None: the config's own)."""
    from pipeline.models.backbone import given

    overrides = given(hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                      patch_size=cfg.patch_size)
    if cfg.width and spec.model != "Dinov2Model":  # Dinov2Config has mlp_ratio; the others an absolute size
        overrides["intermediate_size"] = 4 * cfg.width
    if spec.drop_path:
        overrides["drop_path_rate"] = cfg.drop_path
    return overrides


def random_config(cfg: ModelConfig, spec: Spec, config_cls, overrides: dict):
    """A config for random weights: the class's defaults, the user's shape keys and image size."""
    if spec.model == "Siglip2VisionModel":  # no image size: a learned grid of num_patches positions
        patch = overrides.get("patch_size", config_cls().patch_size)
        return config_cls(num_patches=(cfg.image_size // patch) ** 2, **overrides)
    return config_cls(image_size=cfg.image_size, **overrides)


class PooledOutput(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        kind = model.config.model_type
        # CLIP's position embeddings are tied to the config's image size; other sizes interpolate.
        self.extra = {"interpolate_pos_encoding": True} if kind == "clip_vision_model" else {}
        self.patchify = kind == "siglip2_vision_model"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        inputs = siglip2_inputs(images, self.model.config.patch_size) if self.patchify else {"pixel_values": images}
        out = self.model(**inputs, **self.extra)
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)


def siglip2_inputs(images: torch.Tensor, patch: int) -> dict:
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    patches = images[:, :, :gh * patch, :gw * patch].reshape(b, c, gh, patch, gw, patch)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)
    # The grid on the CPU: the embeddings read it with .tolist() (no device sync; works on the meta device).
    # No mask: every image fills its grid, and an all-ones mask is read with .all() (not on meta or fake tensors).
    return {"pixel_values": patches, "spatial_shapes": torch.tensor([[gh, gw]] * b, device="cpu"),
            "pixel_attention_mask": None}
