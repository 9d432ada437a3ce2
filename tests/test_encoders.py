"""Encoders: seeded construction, local timm weights through the user's path, export round trip."""
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config import ModelConfig
from pipeline.encoders import build_encoder, export, load_exported
from pipeline.errors import UserError

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
