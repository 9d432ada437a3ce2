"""model.pretrained=hub:<tag or hub id>: the library's own pretrained weights, resolved by the library's
download and cache. Offline (HF_HUB_OFFLINE=1) against a cache folder filled here in the Hugging Face
hub's layout (models--org--name/snapshots/<rev>/..., refs/main), so the user's path is the one tested.
huggingface_hub reads its environment once, at import, into huggingface_hub.constants, which its
download functions read at each call: the test sets both."""
import functools
import json
from unittest import mock

import open_clip
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.models.encoders import build_encoder, preprocessing
from pipeline.models.model_check import check_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
TIMM_TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
SHAPES = ["model.image_size=32", "model.patch_size=8", "model.depth=2", "model.width=64", "model.heads=2",
          "model.embed_dim=16", "model.drop_path=0.0"]

# (the user's model arguments, the hub repository the library reads)
SOURCES = {
    "timm": (["model=dinov3_vitl16", "model.arch=vit_small_patch16_dinov3", "model.global_pool=token",
              "model.pretrained=hub:lvd1689m", *SHAPES], "timm/vit_small_patch16_dinov3.lvd1689m"),
    "open_clip": (["model=siglip2_vitl16_256", "model.arch=ViT-B-16-SigLIP2", "model.pretrained=hub:webli", *SHAPES],
                  "timm/ViT-B-16-SigLIP2"),
    "transformers": (["model=dinov3_vitl16_hf", "model.pretrained=hub:facebook/dinov3-vits16-pretrain-lvd1689m",
                      "model.image_size=32", "model.embed_dim=16", "model.depth=null", "model.width=null",
                      "model.heads=null", "model.patch_size=null"], "facebook/dinov3-vits16-pretrain-lvd1689m"),
}

def snapshot(cache, repo: str):
    """The hub's cache layout for one repository at one revision."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    files = folder / "snapshots" / REVISION
    files.mkdir(parents=True)
    return files


def test_library_tags_and_hub_ids_resolve_through_the_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    references = {}
    upstream = timm.create_model("vit_small_patch16_dinov3", num_classes=0, global_pool="token", **TIMM_TINY).eval()
    save_file(upstream.state_dict(), str(snapshot(cache, SOURCES["timm"][1]) / "model.safetensors"))
    references["timm"] = upstream

    model_cfg = open_clip.get_model_config("ViT-B-16-SigLIP2")
    with mock.patch.object(timm, "create_model", functools.partial(timm.create_model, **TIMM_TINY)):
        clip = open_clip.CLIP(embed_dim=768, vision_cfg={**model_cfg["vision_cfg"], "image_size": 32},
                              text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}).eval()
    save_file(clip.state_dict(), str(snapshot(cache, SOURCES["open_clip"][1]) / "open_clip_model.safetensors"))
    references["open_clip"] = clip.encode_image

    hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, patch_size=8, image_size=32,
        num_register_tokens=4)).eval()
    files = snapshot(cache, SOURCES["transformers"][1])
    hf.save_pretrained(files)
    (files / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2] * 3}))
    references["transformers"] = lambda x: hf(pixel_values=x).pooler_output

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, (args, _) in SOURCES.items():
            cfg = load_config(args).model
            check_model(cfg)  # the preflight reads the cached file
            ours = build_encoder(cfg, seed=0).eval().backbone(x)
            torch.testing.assert_close(ours, references[name](x), rtol=1e-5, atol=1e-5, msg=name)
    assert preprocessing(load_config(SOURCES["timm"][0]).model)[0] == [0.485, 0.456, 0.406]  # timm's tag's
    assert preprocessing(load_config(SOURCES["open_clip"][0]).model)[0] == [0.5, 0.5, 0.5]  # the webli tag's
    assert preprocessing(load_config(SOURCES["transformers"][0]).model)[0] == [0.4] * 3  # the cached processor


def test_a_tag_the_library_does_not_know_is_one_line():
    with pytest.raises(UserError, match="timm has no weights vit_small_patch16_dinov3.nope; its tags for "
                                        "vit_small_patch16_dinov3: lvd1689m"):
        check_model(load_config(["model.arch=vit_small_patch16_dinov3", "model.pretrained=hub:nope"]).model)
    with pytest.raises(UserError, match="open_clip has no weights nope for ViT-B-16-SigLIP2; its tags: webli"):
        check_model(load_config(["model=siglip2_so400m14", "model.arch=ViT-B-16-SigLIP2", "model.pretrained=hub:nope"]).model)
