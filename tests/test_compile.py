"""train.compile=true: each block compiled (inductor's C++ backend on the CPU) gives the eager two-pass
step, drop-path masks replayed in pass 2 and activation checkpointing on, to float rounding."""
import math

import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig, load_config
from pipeline.errors import UserError
from pipeline.losses import RecallAtK
from pipeline.models.encoders import build_encoder
from pipeline.parallel.engine import Engine
from pipeline.train.compile import compile_blocks
from pipeline.train.optim import build_optimizer
from pipeline.train.two_pass import two_pass_step


@pytest.mark.slow  # 75 s on a loaded 2-core machine with a cold inductor cache (5 s warm)
def test_compiled_blocks_equal_eager_for_a_two_pass_step():
    cfg = ModelConfig(patch_size=8, depth=2, embed_dim=16, drop_path=0.2, grad_checkpointing=True)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=gen), torch.arange(4).repeat_interleave(2)
    start = build_encoder(cfg, seed=0).state_dict()
    after = []
    for compiled in (False, True):
        model = build_encoder(cfg, seed=0).train()
        compile_blocks(model, compiled)
        # SGD: the comparison is about the gradients (Adam turns rounding noise into full steps)
        optimizer = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0, optimizer="sgd", weight_decay=0.0))
        engine = Engine(model, *optimizer, torch.device("cpu"))
        two_pass_step(engine, images, labels, RecallAtK(ks=(1, 2), tau_rank=0.05), 4, 3, 0)
        after.append(model.state_dict())
        assert (compiled and model.backbone.blocks[0]._compiled_call_impl is not None) or not compiled
    eager, compiled = after
    assert eager.keys() == compiled.keys()  # compiled in place: the same names in checkpoints
    update = math.sqrt(sum(((eager[k] - start[k]) ** 2).sum().item() for k in start))
    error = math.sqrt(sum(((eager[k] - compiled[k]) ** 2).sum().item() for k in start))
    assert error <= 1e-5 * update, (error, update)


def test_unsupported_backend_is_refused_at_load():
    with pytest.raises(UserError, match="train.compile=true compiles each block.*use parallel=none or ddp"):
        load_config(["stage=all", "run_dir=runs/x", "train.compile=true", "parallel=fsdp2"])
    assert load_config(["stage=all", "run_dir=runs/x", "train.compile=true", "parallel=ddp"]).train.compile
    model = build_encoder(ModelConfig(patch_size=8, depth=2, embed_dim=16), seed=0)
    compile_blocks(model, False)
    assert model.backbone.blocks[0]._compiled_call_impl is None
