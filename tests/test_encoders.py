"""Encoders: seeded construction, local timm weights through the user's path, export round trip."""
import dataclasses
import json

import numpy as np
import open_clip
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from pipeline.config import ModelConfig, load_config
from pipeline.data.transforms import eval_transform
from pipeline.errors import UserError
from pipeline.models.encoders import build_encoder, export, load_exported, preprocessing

TINY = dict(patch_size=8, depth=2, embed_dim=16)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (build_encoder(ModelConfig(**TINY), seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head[1].weight, c.head[1].weight)


def test_output_is_l2_normalised():
    out = build_encoder(ModelConfig(**TINY), seed=0).eval()(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_local_timm_weights_load_through_pretrained(tmp_path):
    """A timm checkpoint file, as timm saves it, loaded by model.pretrained=<file>."""
    upstream = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2)
    save_file(upstream.state_dict(), str(tmp_path / "model.safetensors"))
    model = build_encoder(ModelConfig(**TINY, pretrained=str(tmp_path / "model.safetensors")), seed=5)
    for name, tensor in upstream.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    random = build_encoder(ModelConfig(**TINY), seed=5)
    assert not torch.equal(random.backbone.patch_embed.proj.weight, upstream.patch_embed.proj.weight)


def test_missing_pretrained_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_encoder(ModelConfig(**TINY, pretrained=str(tmp_path / "none.safetensors")), seed=0)


def test_export_round_trip(tmp_path):
    model = build_encoder(ModelConfig(**TINY, drop_path=0.2), seed=3).eval()
    export(model, ModelConfig(**TINY, drop_path=0.2), tmp_path)
    loaded = load_exported(tmp_path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


# --- every family: local upstream weights through model=<preset> model.pretrained=<path> -------------

TINY_VIT = ["model.image_size=32", "model.patch_size=8", "model.depth=2", "model.width=64", "model.heads=2",
            "model.embed_dim=16", "model.grad_checkpointing=false"]


def user_model(*args: str) -> ModelConfig:
    """The model config as `python pipeline/run.py model=... ...` resolves it."""
    return load_config(list(args)).model


def assert_loaded(backbone_state: dict, upstream: dict, prefix: str = "") -> None:
    assert upstream
    for name, tensor in upstream.items():
        assert torch.equal(backbone_state[prefix + name], tensor), name


@pytest.mark.parametrize("suffix", ["bin", "safetensors"])
def test_open_clip_local_checkpoint(tmp_path, suffix):
    """A full CLIP checkpoint as open_clip saves it (image + text towers), read by model.pretrained."""
    upstream = open_clip.CLIP(embed_dim=768, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                              text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
                              quick_gelu=True)  # vitl14_clip is OpenAI's ViT-L/14: QuickGELU
    path = tmp_path / f"open_clip_model.{suffix}"
    state = upstream.state_dict()
    torch.save(state, path) if suffix == "bin" else save_file(state, str(path))
    model = build_encoder(user_model("model=vitl14_clip", f"model.pretrained={path}", *TINY_VIT), seed=0)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    assert_loaded(model.backbone.state_dict(), visual)
    assert set(model.backbone.state_dict()) == set(visual)  # the text tower is never built
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the backbone is open_clip's own image tower: same features as the upstream model
        torch.testing.assert_close(model.backbone.eval()(x), upstream.eval().encode_image(x))


def test_open_clip_checkpoint_of_another_model_is_user_error(tmp_path):
    upstream = open_clip.CLIP(embed_dim=768, vision_cfg=dict(image_size=32, layers=1, width=64, head_width=32, patch_size=8),
                              text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    torch.save(upstream.state_dict(), tmp_path / "m.bin")
    with pytest.raises(UserError, match="does not fit open_clip ViT-L-14"):
        build_encoder(user_model("model=vitl14_clip", f"model.pretrained={tmp_path / 'm.bin'}", *TINY_VIT), seed=0)


def test_timm_dinov2_local_checkpoint(tmp_path):
    upstream = timm.create_model("vit_large_patch14_dinov2", num_classes=0, img_size=32, patch_size=8, depth=2,
                                 embed_dim=64, num_heads=2)
    save_file(upstream.state_dict(), str(tmp_path / "model.safetensors"))
    model = build_encoder(user_model("model=dinov2_vitl14", f"model.pretrained={tmp_path / 'model.safetensors'}",
                                     *TINY_VIT), seed=0)
    assert_loaded(model.backbone.state_dict(), upstream.state_dict())


@pytest.mark.parametrize("preset, model_cls, config_cls", [
    ("dinov2_vitl14_hf", transformers.Dinov2Model, transformers.Dinov2Config),
    ("clip_vitl14_hf", transformers.CLIPVisionModel, transformers.CLIPVisionConfig)])
def test_transformers_from_pretrained_folder(tmp_path, preset, model_cls, config_cls):
    """A save_pretrained folder (config.json, model.safetensors, preprocessor_config.json)."""
    upstream = model_cls(config_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                    patch_size=8, image_size=32))
    upstream.save_pretrained(tmp_path)
    transformers.BitImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    cfg = user_model(f"model={preset}", f"model.pretrained={tmp_path}", *TINY_VIT)
    model = build_encoder(cfg, seed=0)
    assert_loaded(model.backbone.state_dict(), upstream.state_dict(), prefix="model.")
    assert preprocessing(cfg) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])  # the folder's image processor
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.eval()(x), upstream.eval()(pixel_values=x).pooler_output)
    export(model, cfg, tmp_path / "export")  # rebuilt from the exported config alone, no pretrained folder
    loaded = load_exported(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_missing_transformers_folder_is_user_error(tmp_path):
    with pytest.raises(UserError, match="from_pretrained folder"):
        build_encoder(user_model("model=dinov2_vitl14_hf", f"model.pretrained={tmp_path / 'none'}", *TINY_VIT), seed=0)


@pytest.mark.parametrize("preset", ["tiny", "vitl14_clip", "dinov2_vitl14", "dinov2_vitl14_hf", "clip_vitl14_hf"])
def test_every_family_freezes_exports_and_checkpoints(tmp_path, preset):
    """Random init of each family (tiny sizes): trainable_blocks, grad checkpointing, export round trip."""
    cfg = user_model(f"model={preset}", *TINY_VIT, "model.trainable_blocks=1", "model.grad_checkpointing=true",
                     "model.drop_path=0.0")
    model = build_encoder(cfg, seed=1).train()
    blocks = {"tiny": "blocks.", "vitl14_clip": "transformer.resblocks.", "dinov2_vitl14": "blocks.",
              "dinov2_vitl14_hf": "model.encoder.layer.", "clip_vitl14_hf": "model.encoder.layers."}[preset]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_blocks = {n for n in trainable if n.startswith("backbone." + blocks)}
    assert in_blocks and all(n.startswith(f"backbone.{blocks}1.") for n in in_blocks)  # the last of 2 blocks only
    assert {"head.0.weight", "head.1.weight"} <= trainable
    assert not any("embed" in n and "backbone" in n and n not in in_blocks for n in trainable)  # patch/pos frozen
    x = torch.randn(3, 3, 32, 32)
    model(x).sum().backward()  # through activation checkpointing
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    everything = build_encoder(dataclasses.replace(cfg, trainable_blocks=-1), seed=1)
    everything(x).sum().backward()  # every trainable parameter is used (DDP requires it)
    assert all(p.grad is not None for p in everything.parameters() if p.requires_grad)
    assert everything(x).shape[-1] == everything.dim == cfg.embed_dim
    no_head = build_encoder(dataclasses.replace(cfg, embed_dim=0), seed=1)
    assert no_head(x).shape[-1] == no_head.dim  # the backbone's own width
    head_only = build_encoder(dataclasses.replace(cfg, trainable_blocks=0), seed=1)
    assert {n for n, p in head_only.named_parameters() if p.requires_grad} == {"head.0.weight", "head.0.bias",
                                                                               "head.1.weight", "head.1.bias"}
    export(model, cfg, tmp_path)
    loaded = load_exported(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert json.loads((tmp_path / "config.json").read_text())["mean"] == preprocessing(cfg)[0]
    # The export as model.pretrained: the whole encoder (head too) starts from it, whatever the seed.
    start = dataclasses.replace(cfg, pretrained=str(tmp_path), mean=None, std=None)
    again = build_encoder(start, seed=7)
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert preprocessing(start) == preprocessing(cfg)


def test_export_of_another_architecture_as_pretrained_is_one_line(tmp_path):
    export(build_encoder(ModelConfig(**TINY), seed=0), ModelConfig(**TINY), tmp_path)
    with pytest.raises(UserError, match=r"exported encoder with depth=2, embed_dim=16; set those model keys"):
        build_encoder(ModelConfig(patch_size=8, depth=3, embed_dim=32, pretrained=str(tmp_path)), seed=0)


def test_model_normalisation_feeds_the_transforms():
    from open_clip.constants import OPENAI_DATASET_MEAN
    from timm.data import IMAGENET_DEFAULT_MEAN
    assert preprocessing(user_model("model=vitl14_clip"))[0] == list(OPENAI_DATASET_MEAN)
    assert preprocessing(user_model("model=dinov2_vitl14"))[0] == list(IMAGENET_DEFAULT_MEAN)
    assert preprocessing(user_model("model=vitl14_clip", "model.mean=[0,0,0]", "model.std=[1,1,1]")) == ([0, 0, 0], [1, 1, 1])
    normalize = eval_transform(user_model("model=vitl14_clip", "model.image_size=8")).transforms[-1]
    assert list(normalize.mean) == list(OPENAI_DATASET_MEAN)


def test_too_many_trainable_blocks_is_user_error():
    with pytest.raises(UserError, match="has 2 blocks"):
        build_encoder(user_model("model=tiny", *TINY_VIT, "model.trainable_blocks=3"), seed=0)
