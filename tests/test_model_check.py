"""The preflight's model check (issue 36, item 4): the model is built on the meta device and the
weights file's names and shapes are compared with it before any stage runs; one line names the
first mismatch."""
import pytest
import timm
import torch
import transformers
from conftest import run_pipeline
from safetensors.torch import save_file

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.models.model_check import check_model

TINY_TIMM = {"num_classes": 0, "img_size": 32, "patch_size": 8, "embed_dim": 192, "num_heads": 3}


def check(*args):
    check_model(load_config(list(args)).model)


def test_mismatched_weights_fail_in_the_preflight_before_the_shards(tmp_path):
    """The user's path: a timm file of 3 blocks for the 2-block model, one line, exit 2, nothing written."""
    save_file(timm.create_model("vit_tiny_patch16_224", depth=3, **TINY_TIMM).state_dict(), str(tmp_path / "w.safetensors"))
    run = tmp_path / "run"
    proc = run_pipeline("stage=all", f"run_dir={run}", "model.depth=2", f"model.pretrained={tmp_path / 'w.safetensors'}",
                        check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "does not fit timm vit_tiny_patch16_224: the file has blocks.2." in lines[0]
    assert not (run / "shards").exists() and not run.exists()


def test_timm_shape_mismatch_names_the_tensor(tmp_path):
    save_file(timm.create_model("vit_tiny_patch16_224", depth=2, **{**TINY_TIMM, "embed_dim": 96}).state_dict(),
              str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match=r"cls_token is \[1, 1, 96\] in the file, \[1, 1, 192\] in the model"):
        check("model.depth=2", f"model.pretrained={tmp_path / 'w.safetensors'}")
    check("model.depth=2", "model.width=96", f"model.pretrained={tmp_path / 'w.safetensors'}")  # it fits that shape


def test_a_model_that_cannot_be_built_is_one_line():
    with pytest.raises(UserError, match="not an open_clip model name"):
        check("model.family=open_clip", "model.arch=ViT-Q-99")
    with pytest.raises(UserError, match="trainable_blocks=9 but the backbone has 2 blocks"):
        check("model.depth=2", "model.trainable_blocks=9")
    with pytest.raises(UserError, match="open_clip RN50 has no ViT image tower"):
        check("model.family=open_clip", "model.arch=RN50")
    with pytest.raises(UserError, match="timm resnet18 has no transformer blocks"):
        check("model.arch=resnet18")
    with pytest.raises(UserError, match="not a supported transformers model; use one of Dinov2Model, CLIPVisionModel, "
                                        "DINOv3ViTModel, Siglip2VisionModel, Aimv2VisionModel"):
        check("model.family=transformers", "model.arch=facebook/dinov3-vits16-pretrain-lvd1689m")


def test_open_clip_checkpoint_of_another_size(tmp_path):
    import open_clip

    upstream = open_clip.CLIP(embed_dim=768, vision_cfg={"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                              text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    torch.save(upstream.state_dict(), tmp_path / "m.bin")
    args = ["model=vitl14_clip", f"model.pretrained={tmp_path / 'm.bin'}", "model.image_size=32", "model.patch_size=8",
            "model.width=64", "model.heads=2"]
    check(*args, "model.depth=2")
    with pytest.raises(UserError, match=r"does not fit open_clip ViT-L-14-quickgelu: transformer.resblocks.2.ln_1.weight"):
        check(*args, "model.depth=3")


def test_transformers_folder_of_another_width(tmp_path):
    upstream = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, patch_size=8, image_size=32,
        num_register_tokens=4))
    upstream.save_pretrained(tmp_path)
    args = ["model=dinov3_vitl16_hf", f"model.pretrained={tmp_path}", "model.image_size=32", "model.depth=null",
            "model.width=null", "model.heads=null", "model.patch_size=null"]
    check(*args)  # the folder's own architecture
    with pytest.raises(UserError, match=r"does not fit transformers DINOv3ViTModel: .* is \[.*64.*\] in the file"):
        check(*args[:-3], "model.width=128", "model.heads=2")
