"""model.lora.* through peft: only the adapters and the head train; the two-pass step equals the
one-pass step with LoRA dropout on (pass 2 replays pass 1's masks); the export merges the adapters
into a plain model whose embeddings equal the adapted model's; a resumed run equals an
uninterrupted one bit for bit, from a checkpoint that holds only what trains."""
import copy

import pytest
import torch
from test_layer_decay import steps_with_resume

from pipeline.config import ModelConfig, TrainConfig, load_config
from pipeline.config.schema import LoraConfig
from pipeline.errors import UserError
from pipeline.losses import RecallAtK
from pipeline.models import accounting, lora
from pipeline.models.encoders import build_encoder, export, load_exported
from pipeline.parallel.engine import Engine
from pipeline.train.optim import build_optimizer
from pipeline.train.two_pass import one_pass_step, two_pass_step

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.2)
TOWERS = {
    "timm": ModelConfig(patch_size=8, depth=2, embed_dim=16, drop_path=0.1, lora=LORA),
    "open_clip": ModelConfig(family="open_clip", arch="ViT-B-32", image_size=32, patch_size=8, depth=2, width=32,
                             heads=2, embed_dim=16, lora=LORA),
    "transformers": ModelConfig(family="transformers", arch="Dinov2Model", image_size=32, patch_size=8, depth=2,
                                width=32, heads=2, embed_dim=16, drop_path=0.1, lora=LORA),
}
# The adapted modules of a block, per tower (peft's names under the block).
ADAPTED = {"timm": {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"},
           "open_clip": {"attn", "attn.base_layer.out_proj", "mlp.c_fc", "mlp.c_proj"},
           "transformers": {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                            "mlp.fc1", "mlp.fc2"}}
BLOCK = {"timm": "blocks.1.", "open_clip": "transformer.resblocks.1.", "transformers": "model.encoder.layer.1."}


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(12, 3, 32, 32, generator=gen), torch.arange(4).repeat_interleave(3)


def trained(cfg: ModelConfig, steps: int = 2):
    """A LoRA encoder after a few AdamW steps (so B is no longer 0 and the adapters change the output)."""
    model = build_encoder(cfg, seed=0).train()
    engine = Engine(model, *build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0)), torch.device("cpu"))
    for step in range(steps):
        two_pass_step(engine, *batch(step), RecallAtK(ks=(1, 2), tau_rank=0.05), 4, 1, step)
    return model


@pytest.mark.parametrize("family", TOWERS)
def test_only_the_adapters_and_the_head_train(family):
    model = build_encoder(TOWERS[family], seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    prefix = "backbone.base_model.model." + BLOCK[family]
    adapted = {n[len(prefix):].split(".lora_A")[0] for n in trainable if n.startswith(prefix) and ".lora_A." in n}
    assert adapted == ADAPTED[family]
    head = sum(p.numel() for p in model.head.parameters())  # the log's count against peft's own
    trains, total = model.backbone.get_nb_trainable_parameters()
    assert accounting.parameters(model) == (total + head, trains + head)
    frozen = build_encoder(TOWERS[family].__class__(**{**TOWERS[family].__dict__, "lora": LoraConfig()}), seed=0).eval()
    images, _ = batch()
    with torch.no_grad():  # B = 0 at the start: the adapted encoder is the frozen one, the same seed the same model
        assert torch.allclose(model.eval()(images), frozen(images), atol=1e-6)
        assert torch.equal(model(images), build_encoder(TOWERS[family], seed=0).eval()(images))


def test_two_pass_equals_one_pass_with_lora_dropout():
    model = trained(TOWERS["timm"], steps=1)  # adapters with B != 0, so their dropout matters
    without_dropout = copy.deepcopy(model)
    for module in without_dropout.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    images, labels = batch(5)
    loss_fn = RecallAtK(ks=(1, 2), tau_rank=0.05)
    results = []
    for m, step_fn in ((model, two_pass_step), (copy.deepcopy(model), one_pass_step), (without_dropout, two_pass_step)):
        engine = Engine(m, *build_optimizer(m, TrainConfig(lr=1e-2, warmup_steps=0)), torch.device("cpu"))
        step_fn(engine, images, labels, loss_fn, 4, 9, 3)
        results.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    two, one, undropped = results
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=1e-5, atol=1e-6), name
    # The masks matter: the same step without LoRA dropout ends elsewhere.
    assert any(not torch.allclose(two[n], undropped[n], rtol=1e-3, atol=1e-5) for n in two if "lora_A" in n)


@pytest.mark.parametrize("family", TOWERS)
def test_export_merges_into_a_plain_model(family, tmp_path):
    cfg = TOWERS[family]
    model = trained(cfg).eval()
    images, _ = batch(7)
    with torch.no_grad():
        adapted = model(images)
    merged, plain_cfg = lora.merge(model, cfg)
    export(merged, plain_cfg, tmp_path / "export")
    loaded = load_exported(tmp_path / "export")
    assert not any("lora" in n or "base_layer" in n for n in loaded.state_dict())
    tower = loaded.backbone.model if family == "transformers" else loaded.backbone  # PooledOutput holds the HF model
    assert type(tower).__module__.split(".")[0] == family
    with torch.no_grad():
        assert torch.allclose(loaded(images), adapted, atol=1e-5)
        assert not torch.allclose(build_encoder(plain_cfg, seed=0).eval()(images), adapted, atol=1e-3)  # it learnt


def test_resumed_run_equals_uninterrupted_and_checkpoints_hold_what_trains(tmp_path):
    cfg, train = TOWERS["timm"], TrainConfig(lr=1e-2, warmup_steps=1, max_steps=3)
    straight = steps_with_resume(cfg, train, tmp_path, stop_at=None)
    resumed = steps_with_resume(cfg, train, tmp_path, stop_at=1)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    saved = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*.distcp"))
    model = build_encoder(cfg, seed=0)
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    everything = sum(p.numel() * 4 for p in model.parameters())
    # weights + AdamW's two moments of what trains (plus DCP's per-tensor overhead); a whole checkpoint
    # would be 3 x everything
    assert 3 * trainable <= saved < everything / 4


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match="need rank >= 0"):
        load_config(["stage=all", "run_dir=runs/x", "model.lora.rank=-1"])
    with pytest.raises(UserError, match="leave model.trainable_blocks=-1"):
        load_config(["stage=all", "run_dir=runs/x", "model.lora.rank=8", "model.trainable_blocks=2"])
    cfg = load_config(["stage=all", "run_dir=runs/x", "model.lora.rank=8", "model.lora.targets=[qkv,proj]"])
    assert cfg.model.lora.rank == 8 and list(cfg.model.lora.targets) == ["qkv", "proj"]


def test_a_lora_checkpoint_is_refused_by_another_model_config(tmp_path):
    from pipeline.models.encoders import architecture
    from pipeline.parallel import checkpoint

    folder = tmp_path / "step_1"
    folder.mkdir()
    (folder / "meta.json").write_text(__import__("json").dumps({"model": architecture(TOWERS["timm"])}))
    plain = TOWERS["timm"].__class__(**{**TOWERS["timm"].__dict__, "lora": LoraConfig()})
    assert "lora" not in architecture(plain)  # checkpoints without LoRA record what they always did
    with pytest.raises(UserError, match=r"differs in model.lora\)"):
        checkpoint._meta(folder, architecture(plain))
    checkpoint._meta(folder, architecture(TOWERS["timm"]))


def test_a_checkpoint_must_hold_every_tensor_that_trains():
    """A LoRA model's checkpoint may leave out its frozen base, not a tensor that trains; a full
    model's may leave out nothing (pipeline/parallel/checkpoint.py's check_complete)."""
    from pipeline.parallel import checkpoint

    model = build_encoder(TOWERS["timm"], seed=0)
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    checkpoint.check_complete(model, trains)
    with pytest.raises(UserError, match=f"lacks 1 of the model's tensors \\({trains[-1]}"):
        checkpoint.check_complete(model, trains[:-1])
    plain = build_encoder(TOWERS["timm"].__class__(**{**TOWERS["timm"].__dict__, "lora": LoraConfig()}), seed=0)
    with pytest.raises(UserError, match="lacks"):
        checkpoint.check_complete(plain, [n for n in plain.state_dict() if not n.startswith("backbone.blocks.0.")])
