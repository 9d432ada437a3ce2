"""train.layer_decay: each parameter's learning rate in the optimizer against the formula written
from its name (block i of L at lr x d^(L-1-i), embeddings d^L, what follows the blocks undecayed,
the head at head_lr), for a timm ViT (timm's own grouping), the same ViT through the generic rule,
an open_clip tower and a transformers DINOv2; and timm's param_groups_layer_decay itself."""
import re

import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.config.schema import LoraConfig
from pipeline.errors import UserError
from pipeline.models.encoders import build_encoder
from pipeline.train import layer_decay
from pipeline.train.optim import build_optimizer

DECAY, LR, HEAD_LR, DEPTH = 0.5, 1.0, 10.0, 3

# family -> (model config, where the block index is in a name, names of the layers after the blocks)
TOWERS = {
    "timm": (ModelConfig(patch_size=8, depth=DEPTH, embed_dim=16), r"^backbone\.blocks\.(\d+)\.", ("backbone.norm.",)),
    "open_clip": (ModelConfig(family="open_clip", arch="ViT-B-32", image_size=32, patch_size=8, depth=DEPTH, width=32,
                              heads=2, embed_dim=16), r"^backbone\.transformer\.resblocks\.(\d+)\.",
                  ("backbone.ln_post.", "backbone.proj")),
    "transformers": (ModelConfig(family="transformers", arch="Dinov2Model", image_size=32, patch_size=8, depth=DEPTH,
                                 width=32, heads=2, embed_dim=16),
                     r"^backbone\.model\.encoder\.layer\.(\d+)\.", ("backbone.model.layernorm.",)),
    # peft's wrapper (LoRA: only the adapters of each block and the head train): the generic rule
    "timm+lora": (ModelConfig(patch_size=8, depth=DEPTH, embed_dim=16, lora=LoraConfig(rank=2)),
                  r"^backbone\.base_model\.model\.blocks\.(\d+)\.", ("backbone.base_model.model.norm.",)),
}


def expected_lr(name: str, block_pattern: str, after: tuple[str, ...]) -> float:
    if name.startswith("head."):
        return HEAD_LR
    block = re.match(block_pattern, name)
    if block:
        return LR * DECAY ** (DEPTH - 1 - int(block.group(1)))
    if name.startswith(after):
        return LR
    return LR * DECAY ** DEPTH  # an embedding (patch, class, position, pre-norm)


def optimizer_lrs(model) -> dict[str, float]:
    optimizer, _ = build_optimizer(model, TrainConfig(lr=LR, head_lr=HEAD_LR, layer_decay=DECAY))
    by_param = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_param[id(p)] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", TOWERS)
def test_each_parameter_lr_is_the_formula(family):
    cfg, blocks, after = TOWERS[family]
    model = build_encoder(cfg, seed=0)
    got = optimizer_lrs(model)
    assert got == {name: pytest.approx(expected_lr(name, blocks, after), rel=1e-12) for name in got}
    # embeddings, the blocks but the last, last block + after, head (LoRA: no embeddings train)
    assert len(set(got.values())) == DEPTH + 1 + (not cfg.lora.rank)


def test_the_generic_rule_equals_timms_on_a_timm_vit(monkeypatch):
    model = build_encoder(TOWERS["timm"][0], seed=0)
    timms = optimizer_lrs(model)
    monkeypatch.setattr(layer_decay, "_timm_layers", lambda backbone: None)
    assert optimizer_lrs(model) == timms


def test_timms_param_groups_agree():
    """timm.optim.param_groups_layer_decay on the bare tower: its lr_scale per parameter."""
    from timm.optim import param_groups_layer_decay

    model = build_encoder(TOWERS["timm"][0], seed=0)
    got = optimizer_lrs(model)
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    for group in param_groups_layer_decay(model.backbone, layer_decay=DECAY):
        for p in group["params"]:
            assert got["backbone." + names[id(p)]] == pytest.approx(LR * group["lr_scale"], rel=1e-12)


def test_frozen_blocks_and_off():
    model = build_encoder(ModelConfig(patch_size=8, depth=DEPTH, embed_dim=16, trainable_blocks=1), seed=0)
    got = optimizer_lrs(model)
    assert got["backbone.blocks.2.attn.qkv.weight"] == LR and "backbone.blocks.0.attn.qkv.weight" not in {
        n for n, p in model.named_parameters() if p.requires_grad}
    optimizer, _ = build_optimizer(model, TrainConfig(lr=LR, head_lr=HEAD_LR))
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [LR, HEAD_LR]


def test_bad_factor_is_one_line():
    with pytest.raises(UserError, match=r"train.layer_decay=0.0: give a factor in \(0, 1\]"):
        TrainConfig(layer_decay=0.0).check()


def test_a_loss_parameters_are_not_decayed():
    loss = torch.nn.Linear(2, 2)
    optimizer, _ = build_optimizer(loss, TrainConfig(lr=LR, layer_decay=DECAY))
    assert {g["initial_lr"] for g in optimizer.param_groups} == {LR}


def steps_with_resume(cfg: ModelConfig, train: TrainConfig, tmp_path, stop_at: int | None, steps: int = 3) -> dict:
    """`steps` two-pass steps (drop-path on, AdamW, the schedule) in one process; with stop_at, the
    engine is checkpointed after that step and a fresh model and engine load it and go on. The weights."""
    from pipeline.losses import RecallAtK
    from pipeline.parallel.engine import Engine
    from pipeline.train.two_pass import two_pass_step

    def fresh():
        model = build_encoder(cfg, seed=0).train()
        return model, Engine(model, *build_optimizer(model, train), torch.device("cpu"))

    model, engine = fresh()
    loss_fn = RecallAtK(ks=(1, 2), tau_rank=0.05)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.arange(4).repeat_interleave(2)
        two_pass_step(engine, images, labels, loss_fn, 4, 7, step)
        if step + 1 == stop_at:
            engine.save(tmp_path / "ckpt")
            model, engine = fresh()
            engine.load(tmp_path / "ckpt")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path):
    cfg = ModelConfig(patch_size=8, depth=2, embed_dim=16, drop_path=0.1)
    train = TrainConfig(lr=1e-3, head_lr=1e-2, layer_decay=0.5, warmup_steps=1, max_steps=3)
    straight = steps_with_resume(cfg, train, tmp_path, stop_at=None)
    resumed = steps_with_resume(cfg, train, tmp_path, stop_at=1)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    undecayed = steps_with_resume(cfg, TrainConfig(lr=1e-3, head_lr=1e-2, warmup_steps=1, max_steps=3), tmp_path, None)
    assert not torch.equal(undecayed["backbone.patch_embed.proj.weight"], straight["backbone.patch_embed.proj.weight"])
