"""The two-pass step equals one step on the whole batch: gradients against plain autograd."""
import copy

import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.parallel.engine import Engine
from pipeline.losses import RecallAtK
from pipeline.models.encoders import build_encoder
from pipeline.train.optim import build_optimizer
from pipeline.train.two_pass import (
    backward_in_chunks,
    chunk_seed,
    embed_without_grad,
    loss_and_grad,
    one_pass_step,
    two_pass_step,
)

SEED, STEP, CHUNK = 3, 7, 6


def setup(drop_path: float):
    model = build_encoder(ModelConfig(patch_size=8, depth=2, embed_dim=24, drop_path=drop_path), seed=0).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 32, 32, generator=gen)   # 20 = 3 full chunks + one of 2
    labels = torch.arange(5).repeat_interleave(4)[torch.randperm(20, generator=gen)]
    return model, images, labels, RecallAtK(ks=(1, 2, 4, 8), tau_rank=0.05)


def engine_for(model):
    optimizer, scheduler = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=0))
    return Engine(model, optimizer, scheduler, torch.device("cpu"))


def two_pass_grads(model, images, labels, loss_fn, seeds):
    engine = engine_for(model)
    embeddings = embed_without_grad(engine, images, CHUNK, seeds)
    loss, grad = loss_and_grad(embeddings, labels, loss_fn)
    backward_in_chunks(engine, images, grad, CHUNK, seeds)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def autograd_grads(model, images, labels, loss_fn, chunk, seeds=None):
    """Independent reference: one autograd graph over the whole batch."""
    outputs = []
    for i, start in enumerate(range(0, len(images), chunk)):
        with torch.random.fork_rng(devices=[]):
            if seeds is not None:
                torch.manual_seed(seeds[i])
            outputs.append(model(images[start:start + chunk]))
    loss = loss_fn(torch.cat(outputs), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(a: dict, b: dict, rtol=1e-5):
    for name in a:
        err = (a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative gradient difference {err:.2e}"


def seeds_for(n):
    return [chunk_seed(SEED, STEP, s) for s in range(0, n, CHUNK)]


def test_equals_whole_batch_autograd_without_dropout():
    model, images, labels, loss_fn = setup(drop_path=0.0)
    ref_model = copy.deepcopy(model)
    loss, grads = two_pass_grads(model, images, labels, loss_fn, seeds_for(len(images)))
    ref_loss, ref_grads = autograd_grads(ref_model, images, labels, loss_fn, chunk=len(images))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert_close(grads, ref_grads)


def test_equals_whole_batch_autograd_with_drop_path():
    model, images, labels, loss_fn = setup(drop_path=0.3)
    seeds = seeds_for(len(images))
    ref_model = copy.deepcopy(model)
    loss, grads = two_pass_grads(model, images, labels, loss_fn, seeds)
    ref_loss, ref_grads = autograd_grads(ref_model, images, labels, loss_fn, chunk=CHUNK, seeds=seeds)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert_close(grads, ref_grads)

    # The comparison can fail: pass 2 under other RNG states gives other gradients.
    other = copy.deepcopy(ref_model)
    other.zero_grad(set_to_none=True)
    engine = engine_for(other)
    _, grad = loss_and_grad(embed_without_grad(engine, images, CHUNK, seeds), labels, loss_fn)
    backward_in_chunks(engine, images, grad, CHUNK, [s + 1 for s in seeds])
    with pytest.raises(AssertionError):
        assert_close({n: p.grad for n, p in other.named_parameters()}, ref_grads)


def sgd_engine(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return Engine(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0), torch.device("cpu"))


def test_step_equals_one_pass_step():
    """Weights after two optimizer steps: two-pass vs the naive one-pass step.

    SGD, not AdamW: the key bias of attention has an exactly zero gradient (softmax ignores it), so
    its computed gradient is rounding noise, which Adam's normalised update turns into real steps.
    """
    model, images, labels, loss_fn = setup(drop_path=0.2)
    ref = copy.deepcopy(model)
    a, b = sgd_engine(model), sgd_engine(ref)
    for step in range(2):
        two_pass_step(a, images, labels, loss_fn, CHUNK, SEED, step)
        one_pass_step(b, images, labels, loss_fn, CHUNK, SEED, step)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(model.head[1].weight, build_encoder(
        ModelConfig(patch_size=8, depth=2, embed_dim=24), seed=0).head[1].weight), "the steps changed nothing"


def test_global_rng_untouched():
    model, images, labels, loss_fn = setup(drop_path=0.1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    two_pass_grads(model, images, labels, loss_fn, seeds_for(len(images)))
    assert torch.equal(before, torch.get_rng_state())
