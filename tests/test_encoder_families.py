"""The 2026 foundations as first-class encoders (issue 37): each tower its library builds (open_clip's
timm towers, DINOv3, SigLIP 2, AIMv2, PE-Core, EVA-02), `model.arch=` meaning that architecture, the
presets' parameter counts against the library's own model, and weights in each upstream format
giving the library's own forward. Tiny shapes (depth 2, width 64), except the meta-device counts."""
import contextlib
import functools
from unittest import mock

import open_clip
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

from pipeline.config import TrainConfig, load_config
from pipeline.config.loader import resolve
from pipeline.models import accounting
from pipeline.models.encoders import build_encoder, export, load_exported
from pipeline.parallel.engine import transformer_blocks
from pipeline.train.optim import build_optimizer

TINY = ["model.image_size=32", "model.patch_size=8", "model.depth=2", "model.width=64", "model.heads=2",
        "model.embed_dim=16", "model.drop_path=0.0"]
TIMM_TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}

# One of each new tower type: (the user's model arguments, the blocks' prefix in the backbone)
TOWERS = {
    "open_clip SigLIP 2 (timm ViT trunk)": (["model.family=open_clip", "model.arch=ViT-B-16-SigLIP2"], "trunk.blocks."),
    "open_clip PE-Core (timm EVA trunk)": (["model=pecore_l14_336"], "trunk.blocks."),
    "open_clip EVA-02": (["model=eva02_l14"], "trunk.blocks."),
    "timm DINOv3": (["model=dinov3_vitl16"], "blocks."),
    "timm AIMv2": (["model=aimv2_l14"], "blocks."),
    "transformers DINOv3": (["model=dinov3_vitl16_hf"], "model.model.layer."),
    "transformers SigLIP 2": (["model.family=transformers", "model.arch=Siglip2VisionModel"], "model.encoder.layers."),
    "transformers AIMv2": (["model.family=transformers", "model.arch=Aimv2VisionModel"], "model.encoder.layers."),
}


def user_model(*args):
    return load_config(list(args)).model


@pytest.mark.parametrize("tower", list(TOWERS))
def test_each_tower_freezes_checkpoints_shards_and_exports(tower, tmp_path):
    """trainable_blocks=1 under activation checkpointing: only the last block, what follows it and the
    head get gradients; FSDP2's block finder sees the tower's blocks; the export rebuilds it; its FLOPs
    count on the meta device (what the plan and the MFU log do)."""
    args, blocks = TOWERS[tower]
    cfg = user_model(*args, *TINY, "model.trainable_blocks=1", "model.grad_checkpointing=true")
    model = build_encoder(cfg, seed=1).train()
    x = torch.randn(3, 3, 32, 32)
    model(x).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_blocks = {n for n in trainable if n.startswith("backbone." + blocks)}
    assert in_blocks and all(n.startswith(f"backbone.{blocks}1.") for n in in_blocks), sorted(trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    found = transformer_blocks(model)
    assert len(found) == 2 and found[1] is model.get_submodule(f"backbone.{blocks}1")
    export(model, cfg, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path)(x), model.eval()(x))
    assert accounting.flops_per_image(cfg, 2) > 0


@pytest.mark.parametrize("tower", list(TOWERS))
def test_each_tower_takes_lora_and_layer_decay(tower):
    """model.lora (issue 39): peft adapts every block, and only the adapters and the head get gradients;
    train.layer_decay: block i of 2 at lr x d^(1-i), the head at head_lr, the rest at lr x d^2 (before
    the blocks) or lr (after them), some of it decayed (the patch embedding)."""
    args, blocks = TOWERS[tower]
    model = build_encoder(user_model(*args, *TINY, "model.lora.rank=2"), seed=1).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    prefix = "backbone.base_model.model." + blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n[len(prefix)] for n in trainable if n.startswith(prefix) and ".lora_A." in n} == {"0", "1"}, sorted(trainable)
    assert all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
    plain = build_encoder(user_model(*args, *TINY), seed=1)
    optimizer, _ = build_optimizer(plain, TrainConfig(lr=1.0, head_lr=10.0, layer_decay=0.5))
    lr = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    got = {n: lr[id(p)] for n, p in plain.named_parameters() if p.requires_grad}
    for name, value in got.items():
        block = name[len("backbone." + blocks):].split(".")[0] if name.startswith("backbone." + blocks) else None
        want = 10.0 if name.startswith("head.") else 0.5 ** (1 - int(block)) if block else value
        assert value == pytest.approx(want) and value in (10.0, 1.0, 0.5, 0.25), (name, value)
    assert 0.25 in got.values()


def test_model_arch_means_that_architecture():
    """model.arch= on the command line drops the default preset's shapes: the library's exact model."""
    r = resolve(["model.family=timm", "model.arch=vit_small_patch16_dinov3"])
    with torch.device("meta"):
        ours = build_encoder(r.config.model, seed=0).backbone
        theirs = timm.create_model("vit_small_patch16_dinov3", num_classes=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 21_586_944
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert r.config.model.mean is None and r.sources["model.depth"].startswith("model.arch=vit_small_patch16_dinov3")
    assert any("depth=4" in note for note in r.notes)
    kept = resolve(["model.arch=vit_small_patch16_dinov3", "model.depth=2"]).config.model
    assert (kept.depth, kept.patch_size) == (2, None)  # a shape key given with it is kept
    same = resolve(["model.depth=3"]).config.model  # no model.arch: the preset's shapes stay
    assert (same.depth, same.patch_size) == (3, 8)


L_PRESETS = ["dinov3_vitl16", "siglip2_so400m14", "siglip2_vitl16_256", "pecore_l14_336", "eva02_l14", "aimv2_l14"]


def library_model(cfg):
    if cfg.family == "timm":
        return timm.create_model(cfg.arch, num_classes=0)
    return open_clip.create_model(cfg.arch, device="meta").visual


@pytest.mark.parametrize("preset", L_PRESETS)
def test_preset_has_the_librarys_parameter_count(preset):
    """Built on the meta device (no memory): the preset's backbone against the library's own model."""
    cfg = user_model(f"model={preset}")
    with torch.device("meta"):
        ours, theirs = build_encoder(cfg, seed=0).backbone, library_model(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# --- weights in each upstream format, against the library's own forward of the same weights ---------

def assert_same_embedding(model, reference_forward, x):
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.eval()(x), reference_forward(x), rtol=1e-5, atol=1e-5)


def dinov3_released_layout(state: dict) -> dict:
    """timm's DINOv3 state dict in the layout of Meta's released .pth (facebookresearch/dinov3): storage
    tokens, ls1/ls2 gammas, one qkv bias (with the k part zero), rope periods and the mask token."""
    out = {}
    for k, v in state.items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if k.endswith("attn.q_bias"):
            v_bias = state[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.zeros_like(v), v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * len(v))
        elif not k.endswith("attn.v_bias"):
            out[k] = v
    dim = state["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = torch.ones(dim // 2 // 4)
    return out


def test_dinov3_released_pth_loads_through_timm(tmp_path):
    upstream = timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, global_pool="token", **TIMM_TINY)
    for p in upstream.parameters():  # biases and layer scales away from their init, so a misload shows
        torch.nn.init.normal_(p, std=0.2)
    torch.save(dinov3_released_layout(upstream.state_dict()), tmp_path / "dinov3_vits16_pretrain.pth")
    cfg = user_model("model=dinov3_vitl16", "model.arch=vit_small_patch16_dinov3_qkvb",
                     f"model.pretrained={tmp_path / 'dinov3_vits16_pretrain.pth'}", *TINY)
    assert_same_embedding(build_encoder(cfg, seed=0), upstream.eval(), torch.randn(2, 3, 32, 32))


def test_aimv2_timm_safetensors(tmp_path):
    upstream = timm.create_model("aimv2_large_patch14_224", num_classes=0, **TIMM_TINY)
    save_file(upstream.state_dict(), str(tmp_path / "model.safetensors"))
    cfg = user_model("model=aimv2_l14", f"model.pretrained={tmp_path / 'model.safetensors'}", *TINY)
    assert_same_embedding(build_encoder(cfg, seed=0), upstream.eval(), torch.randn(2, 3, 32, 32))


@contextlib.contextmanager
def tiny_timm_trunks():
    """open_clip builds its timm towers at the library's size; the test's reference at the tiny one."""
    with mock.patch.object(timm, "create_model", functools.partial(timm.create_model, **TIMM_TINY)):
        yield


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP2", "PE-Core-T-16-384"])
def test_open_clip_timm_tower_checkpoint(arch, tmp_path):
    """A full open_clip checkpoint (image and text towers) of a timm-backed model, read by model.pretrained."""
    model_cfg = open_clip.get_model_config(arch)
    with tiny_timm_trunks():
        upstream = open_clip.CLIP(embed_dim=model_cfg["embed_dim"], vision_cfg={**model_cfg["vision_cfg"], "image_size": 32},
                                  text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    save_file(upstream.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    args = ["model.family=open_clip", f"model.arch={arch}", f"model.pretrained={tmp_path / 'open_clip_model.safetensors'}",
            *TINY]
    cfg = user_model(*args)
    model = build_encoder(cfg, seed=0)
    assert set(model.backbone.state_dict()) == {k[len("visual."):] for k in upstream.state_dict() if k.startswith("visual.")}
    assert_same_embedding(model, upstream.eval().encode_image, torch.randn(2, 3, 32, 32))
    # Another image size: the position table resampled (a 4x4 grid to 6x6), as timm does for its own weights.
    larger = build_encoder(user_model(*args, "model.image_size=48"), seed=0)
    trunk = upstream.visual.trunk
    prefix = 0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens
    expected = timm.layers.resample_abs_pos_embed(trunk.pos_embed.detach(), new_size=(6, 6), num_prefix_tokens=prefix)
    torch.testing.assert_close(larger.backbone.trunk.pos_embed.detach(), expected)
    assert larger.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 16)


def siglip2_reference(upstream, x):
    """SigLIP 2's own patching (the image processor's convert_image_to_patches), image by image."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    patches = torch.stack([convert_image_to_patches(image, 8) for image in x])
    grid = torch.tensor([[x.shape[2] // 8, x.shape[3] // 8]] * len(x))
    return upstream(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
                    spatial_shapes=grid).pooler_output


HF_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256, "patch_size": 8}


@pytest.mark.parametrize("arch", ["DINOv3ViTModel", "Siglip2VisionModel", "Aimv2VisionModel"])
def test_transformers_folder(arch, tmp_path):
    """A save_pretrained folder (SigLIP 2: the full model's, text tower included), through the user's path."""
    if arch == "DINOv3ViTModel":
        upstream = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**HF_TINY, image_size=32,
                                                                            num_register_tokens=4))
        saved, reference = upstream, lambda x: upstream(pixel_values=x).pooler_output
    elif arch == "Siglip2VisionModel":
        vision = transformers.Siglip2VisionConfig(**HF_TINY, num_patches=16)
        saved = transformers.Siglip2Model(transformers.Siglip2Config(
            vision_config=vision.to_dict(), text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                             "intermediate_size": 64, "vocab_size": 50000}))
        upstream = saved.vision_model
        reference = functools.partial(siglip2_reference, upstream)
    else:
        upstream = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**HF_TINY, image_size=32))
        saved, reference = upstream, lambda x: upstream(pixel_values=x).pooler_output
    for p in saved.parameters():
        torch.nn.init.normal_(p, std=0.1)
    saved.save_pretrained(tmp_path)
    cfg = user_model("model.family=transformers", f"model.arch={arch}", f"model.pretrained={tmp_path}",
                     "model.image_size=32", "model.embed_dim=16")
    upstream.eval()
    assert_same_embedding(build_encoder(cfg, seed=0), reference, torch.randn(2, 3, 32, 32))
