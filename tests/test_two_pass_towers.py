"""The two-pass step equals the one-pass step for each new tower type (open_clip's timm tower, DINOv3
with RoPE and registers, SigLIP 2's NaFlex tower, AIMv2), under activation checkpointing with only the
last block trainable: the pattern of tests/test_two_pass.py, on tiny shapes."""
import copy

import pytest
import torch
from test_two_pass import CHUNK, SEED, sgd_engine

from pipeline.config import load_config
from pipeline.losses import RecallAtK
from pipeline.models.encoders import build_encoder
from pipeline.train.two_pass import one_pass_step, two_pass_step

TINY = ["model.image_size=32", "model.patch_size=8", "model.depth=2", "model.width=64", "model.heads=2",
        "model.embed_dim=24", "model.grad_checkpointing=true", "model.trainable_blocks=1"]
TOWERS = {
    "open_clip SigLIP 2": ["model.family=open_clip", "model.arch=ViT-B-16-SigLIP2", "model.drop_path=0.2"],
    "timm DINOv3": ["model=dinov3_vitl16", "model.drop_path=0.2"],
    "transformers DINOv3": ["model=dinov3_vitl16_hf", "model.drop_path=0.2"],
    "transformers SigLIP 2": ["model.family=transformers", "model.arch=Siglip2VisionModel"],
    "transformers AIMv2": ["model.family=transformers", "model.arch=Aimv2VisionModel"],
}


@pytest.mark.parametrize("tower", list(TOWERS))
def test_two_pass_step_equals_one_pass_step(tower):
    cfg = load_config([*TOWERS[tower], *TINY]).model
    model = build_encoder(cfg, seed=0).train()
    for name, p in model.named_parameters():  # timm's DINOv3 starts its layer scales at 1e-5; trained ones are not
        if ".gamma_" in name:
            torch.nn.init.constant_(p, 1.0)
    start = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 32, 32, generator=gen)
    labels = torch.arange(5).repeat_interleave(4)[torch.randperm(20, generator=gen)]
    loss_fn = RecallAtK(ks=(1, 2, 4, 8), tau_rank=0.05)
    a, b = sgd_engine(model), sgd_engine(ref)
    losses = []
    for step in range(2):
        losses.append(two_pass_step(a, images, labels, loss_fn, CHUNK, SEED, step).item())
        one_pass_step(b, images, labels, loss_fn, CHUNK, SEED, step)
    assert abs(losses[1] - losses[0]) > 1e-3, losses  # the first step moved the loss: gradients, not rounding noise
    moved = 0
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        moved += p.requires_grad and not torch.equal(p, p0)
    assert moved > 4, "the steps changed (almost) nothing"
