"""The optimizers and schedules of train.optimizer / train.schedule / train.epochs, against torch's
MultiStepLR, hand-written Adam/AdamW first steps, and IBC's RAdam.py re-implemented here."""
import math

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.train.optim import build_optimizer, lr_factor, resolve_epochs


def lrs(cfg: TrainConfig, per_epoch: int, steps: int) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, cfg, per_epoch)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_epochs_decide_max_steps_and_are_recorded():
    cfg, facts = resolve_epochs(TrainConfig(global_batch=128, epochs=3, max_steps=5), train_images=1000)
    assert cfg.max_steps == 21 and facts == {"sampler": "pk", "train_images": 1000, "steps_per_epoch": 7, "epochs": 3, "max_steps": 21}
    cfg, facts = resolve_epochs(TrainConfig(global_batch=4000, max_steps=5), train_images=900)
    assert cfg.max_steps == 5 and facts["steps_per_epoch"] == 1 and facts["epochs"] is None


def test_step_schedule_is_multisteplr_stepped_once_per_epoch():
    per_epoch, epochs, milestones = 3, 8, [2, 5]
    cfg = TrainConfig(lr=0.01, schedule="step", milestones=milestones, gamma=0.3, warmup_steps=0, epochs=epochs)
    cfg, facts = resolve_epochs(cfg, train_images=per_epoch * cfg.global_batch + 5)
    assert facts["steps_per_epoch"] == per_epoch and cfg.max_steps == per_epoch * epochs
    reference_opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.01)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_opt, milestones=milestones, gamma=0.3)
    expected = []
    for _ in range(epochs):   # the papers' loops: a whole epoch at one lr, then scheduler.step()
        expected += [reference.get_last_lr()[0]] * per_epoch
        reference_opt.step()
        reference.step()
    assert lrs(cfg, per_epoch, cfg.max_steps) == pytest.approx(expected, rel=1e-12)
    assert len(set(expected)) == 3


def test_cosine_schedule_is_unchanged():
    cfg = TrainConfig(lr=1.0, max_steps=20, warmup_steps=4)
    expected = [(s + 1) / 4 if s < 4 else 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(20)]
    assert lrs(cfg, 1, 20) == pytest.approx(expected, rel=1e-12)


def test_warmup_fraction_is_that_share_of_each_runs_steps():
    """Issue 40: batch 128 and 1,024 for 15 epochs of the glyphs' 12,266 images warm up over 5% of their
    own steps (1,425 -> 71, 165 -> 8), against the formula written out here."""
    for batch, warm in ((128, 71), (1024, 8)):
        cfg, _ = resolve_epochs(TrainConfig(lr=1.0, global_batch=batch, epochs=15, warmup_steps=10, warmup_fraction=0.05),
                                train_images=12266)
        n = cfg.max_steps
        expected = [(s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (n - warm))) for s in range(n)]
        factor = lr_factor(cfg)  # batch 1,024 through the optimizer too; 1,425 optimizer steps would cost 2 s
        got = lrs(cfg, 1, n) if batch == 1024 else [factor(s) for s in range(n)]
        assert got == pytest.approx(expected, rel=1e-12), batch
    tiny = TrainConfig(lr=1.0, max_steps=4, warmup_fraction=0.05)   # 0.2 steps: still one warmup step
    assert lrs(tiny, 1, 1) == [1.0]
    with pytest.raises(UserError, match="train.warmup_fraction=1"):
        TrainConfig(warmup_fraction=1.0).check()


def one_step(kind: str, wd=0.1, lr=0.01):
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.0, -1.0]]))
    before = model.weight.detach().clone()
    optimizer, _ = build_optimizer(model, TrainConfig(optimizer=kind, lr=lr, weight_decay=wd, warmup_steps=0))
    grad = torch.tensor([[0.2, -0.1, 0.0], [0.05, 0.3, -0.2]])
    model.weight.grad = grad.clone()
    optimizer.step()
    return before, grad, model.weight.detach()


def test_adam_with_l2_differs_from_adamw_on_one_step():
    eps, wd, lr = 1e-8, 0.1, 0.01
    p, g, adam = one_step("adam", wd, lr)
    coupled = g + wd * p                    # Adam: the decay is part of the gradient, then normalised
    torch.testing.assert_close(adam, p - lr * coupled / (coupled.abs() + eps))
    p, g, adamw = one_step("adamw", wd, lr)
    torch.testing.assert_close(adamw, p * (1 - lr * wd) - lr * g / (g.abs() + eps))   # decoupled
    assert (adam - adamw).abs().max() > 1e-3


def ibc_radam(params, grads_per_step, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """IBC's RAdam.py:16-80 for one parameter tensor."""
    p = params.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
    beta1, beta2 = betas
    for step, grad in enumerate(grads_per_step, start=1):
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        beta2_t = beta2 ** step
        n_sma_max = 2 / (1 - beta2) - 1
        n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
        if n_sma >= 5:
            step_size = lr * math.sqrt((1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
                                       * n_sma_max / (n_sma_max - 2)) / (1 - beta1 ** step)
        else:
            step_size = lr / (1 - beta1 ** step)
        p.add_(p, alpha=-weight_decay * lr)
        if n_sma >= 5:
            p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size)
        else:
            p.add_(exp_avg, alpha=-step_size)
    return p


def test_radam_is_ibcs():
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    start = model.weight.detach().clone()
    grads = [torch.randn(3, 4, generator=gen) for _ in range(12)]   # through the un-rectified steps and past them
    optimizer, _ = build_optimizer(model, TrainConfig(optimizer="radam", lr=0.01, weight_decay=0.05, warmup_steps=0))
    for g in grads:
        model.weight.grad = g.clone()
        optimizer.step()
    torch.testing.assert_close(model.weight.detach(), ibc_radam(start, grads, 0.01, 0.05), rtol=1e-5, atol=1e-7)


def test_parameter_groups():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.head = nn.Linear(3, 2)
    groups = lambda **kw: sorted((g["lr"], g["weight_decay"], len(g["params"]))
                                 for g in build_optimizer(model, TrainConfig(warmup_steps=0, **kw))[0].param_groups)
    assert groups(lr=1e-4, head_lr=1e-3, weight_decay=0.05) == [(1e-4, 0.0, 3), (1e-4, 0.05, 1), (1e-3, 0.0, 1),
                                                                (1e-3, 0.05, 1)]
    assert groups(lr=1e-4, head_lr=None, weight_decay=4e-4, decay_norms_biases=True) == [(1e-4, 4e-4, 6)]
    assert type(build_optimizer(model, TrainConfig(optimizer="sgd"))[0]).__name__ == "SGD"


@pytest.mark.parametrize("kw, message", [
    ({"optimizer": "lamb"}, "train.optimizer=lamb: use one of adamw, adam, sgd, radam"),
    ({"schedule": "poly"}, "train.schedule=poly"),
    ({"milestones": [20, 10]}, "increasing order"),
    ({"epochs": 0}, "train.epochs=0"),
    ({"small_classes": "drop"}, "use repeat or skip"),
])
def test_bad_settings_are_one_line(kw, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        TrainConfig(**kw).check()
