"""Untrusted files: the project's own files load without unpickling arbitrary objects; a file that
needs it (weights or a checkpoint from elsewhere) is refused in one line unless
train.trust_checkpoint=true, and then loads."""
import pickle
import random

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.distributed.checkpoint as dcp
import transformers
from conftest import SMALL
from test_encoders import TINY_VIT

from pipeline import trust
from pipeline.config import ModelConfig, load_config
from pipeline.parallel import checkpoint
from pipeline.errors import UserError
from pipeline.models.encoders import build_encoder

TINY = dict(patch_size=8, depth=2, embed_dim=16)


class Payload:
    """What a hostile file would carry: unpickling it runs code (here: it touches a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(autouse=True)
def untrusted():
    trust.allow_pickle(False)
    yield
    trust.allow_pickle(False)


def test_rng_states_round_trip_through_weights_only(tmp_path):
    random.random(), np.random.randn(3), torch.rand(3)  # leave numpy a cached gaussian
    checkpoint.save_rng(tmp_path)
    expected = (random.random(), random.gauss(0, 1), np.random.randn(5), torch.rand(5))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rank_0.pt")) == []
    torch.load(tmp_path / "rank_0.pt", weights_only=True)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.load_rng(tmp_path, same_world=True)
    got = (random.random(), random.gauss(0, 1), np.random.randn(5), torch.rand(5))
    assert got[:2] == expected[:2] and np.array_equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_rng_file_that_needs_pickle_is_refused(tmp_path):
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, tmp_path / "rank_0.pt")
    with pytest.raises(UserError, match=r"needs pickle.*numpy.*train.trust_checkpoint=true"):
        checkpoint.load_rng(tmp_path, same_world=True)


def test_dcp_item_that_needs_pickle_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    dcp.save({"w": torch.ones(2), "extra": Payload(marker)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    state = {"w": torch.zeros(2), "extra": None}
    with pytest.raises(UserError, match=r"item extra of checkpoint .* \(io.open\).*train.trust_checkpoint=true"):
        trust.load_dcp(tmp_path / "ckpt", state)
    assert not marker.exists()
    trust.allow_pickle(True)
    trust.load_dcp(tmp_path / "ckpt", state)
    assert marker.exists() and torch.equal(state["w"], torch.ones(2))


def test_dcp_metadata_that_needs_pickle_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.planner_data = Payload(tmp_path / "ran")
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match=r"metadata .* \(io.open\).*train.trust_checkpoint=true"):
        trust.load_dcp(folder, {"w": torch.zeros(2)})
    assert not (tmp_path / "ran").exists()


def test_project_dcp_checkpoint_loads_restricted(digits_run):
    """A real checkpoint of the pipeline (model, optimizer, scheduler, RNG) under the restricted loaders."""
    model = build_encoder(load_config(SMALL).model, seed=0)
    meta = checkpoint.load_weights(digits_run / "checkpoints" / "step_6", model)
    assert meta["step"] == 6
    checkpoint.load_rng(digits_run / "checkpoints" / "step_6" / "rng", same_world=True)


def test_pretrained_weights_that_need_pickle_are_refused_unless_trusted(tmp_path):
    upstream = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=2)
    marker = tmp_path / "ran"
    torch.save({"state_dict": upstream.state_dict(), "args": Payload(marker)}, tmp_path / "model.pth")
    cfg = ModelConfig(**TINY, pretrained=str(tmp_path / "model.pth"))
    with pytest.raises(UserError, match=r"model.pretrained .*needs pickle.*train.trust_checkpoint=true"):
        build_encoder(cfg, seed=0)
    assert not marker.exists()
    trust.allow_pickle(True)
    model = build_encoder(cfg, seed=0)
    assert marker.exists()
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in upstream.state_dict().items())


def test_transformers_bin_weights_that_need_pickle_are_refused_unless_trusted(tmp_path):
    """A from_pretrained folder with pytorch_model.bin (transformers itself always reads .bin files
    with weights_only=True, so the trusted path reads them and hands them over)."""
    upstream = transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                                  intermediate_size=128, image_size=32, patch_size=8))
    upstream.config.save_pretrained(tmp_path)
    torch.save({**upstream.state_dict(), "args": Payload(tmp_path / "ran")}, tmp_path / "pytorch_model.bin")
    cfg = load_config(["model=dinov2_vitl14_hf", f"model.pretrained={tmp_path}", "model.image_size=32",
                       "model.patch_size=8", "model.width=32", "model.depth=1", "model.heads=2"]).model
    with pytest.raises(UserError, match=r"model.pretrained .*needs pickle.*train.trust_checkpoint=true"):
        build_encoder(cfg, seed=0)
    assert not (tmp_path / "ran").exists()
    trust.allow_pickle(True)
    model = build_encoder(cfg, seed=0)
    assert (tmp_path / "ran").exists()
    assert all(torch.equal(model.backbone.model.state_dict()[k], v) for k, v in upstream.state_dict().items())


def test_open_clip_weights_that_need_pickle_are_refused_unless_trusted(tmp_path):
    upstream = open_clip.CLIP(embed_dim=768, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                              text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    torch.save({"state_dict": upstream.state_dict(), "args": Payload(tmp_path / "ran")}, tmp_path / "clip.bin")
    cfg = load_config(["model=vitl14_clip", f"model.pretrained={tmp_path / 'clip.bin'}", *TINY_VIT]).model
    with pytest.raises(UserError, match=r"model.pretrained .*needs pickle.*train.trust_checkpoint=true"):
        build_encoder(cfg, seed=0)
    assert not (tmp_path / "ran").exists()
    trust.allow_pickle(True)
    model = build_encoder(cfg, seed=0)
    assert (tmp_path / "ran").exists()
    assert torch.equal(model.backbone.conv1.weight, upstream.visual.conv1.weight)
