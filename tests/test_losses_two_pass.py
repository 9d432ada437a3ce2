"""Every loss through the two-pass step: encoder and loss-parameter gradients equal one autograd
graph over the whole batch (drop-path on, chunks under their seeds)."""
import copy

import pytest
import torch
from test_two_pass import CHUNK, assert_close, autograd_grads, seeds_for, setup, two_pass_grads

from pipeline.config import LossConfig, TrainConfig
from pipeline.losses import NAMES, build_loss, set_step

ROTH = {"miner": "distance", "p_switch": 0.5, "reduction": "mean"}   # Roth's rho miner and criteria (recipe=roth)
CASES = [LossConfig(name=n) for n in NAMES] + [
    LossConfig(name="margin", miner="distance", p_switch=0.5), LossConfig(name="triplet", distance_power=2, **ROTH),
    LossConfig(name="contrastive", margin=1.0, **ROTH), LossConfig(name="rsk_simix", simix_per_class=2),
    LossConfig(name="mpn", mpn_layers=2, mpn_heads=2, mpn_concat=True), LossConfig(name="mpn", mpn_layers=0)]
IDS = [c.name + ("_rho" if c.p_switch else "") + ("_2pc" if c.simix_per_class else "") +
       ("_concat" if c.mpn_concat else "") + ("_backbone_only" if c.name == "mpn" and not c.mpn_layers else "")
       for c in CASES]


def make_loss(cfg: LossConfig, labels: torch.Tensor):
    loss_fn = build_loss(cfg, TrainConfig(ks=[1, 2, 4, 8], tau_rank=0.05), labels.unique().tolist(), dim=24, seed=1)
    set_step(loss_fn, 5)
    return loss_fn


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_two_pass_equals_whole_batch(cfg):
    model, images, labels, _ = setup(drop_path=0.3)
    loss_fn = make_loss(cfg, labels)
    ref_model, ref_loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    seeds = seeds_for(len(images))

    loss, grads = two_pass_grads(model, images, labels, loss_fn, seeds)
    ref_loss, ref_grads = autograd_grads(ref_model, images, labels, ref_loss_fn, chunk=CHUNK, seeds=seeds)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    assert ref_loss.item() != 0.0 and ref_grads["head.1.weight"].norm() > 0, "vacuous: no gradient"
    assert_close(grads, ref_grads, rtol=1e-4)

    params = dict(loss_fn.named_parameters())
    ref_params = dict(ref_loss_fn.named_parameters())
    for name, p in ref_params.items():
        if p.requires_grad:   # (the MPN's BatchNorm neck keeps its shift frozen at 0, as IBC's)
            assert p.grad is not None and p.grad.norm() > 0, f"loss parameter {name} got no gradient"
    params = {n: p for n, p in params.items() if p.requires_grad}
    ref_params = {n: p for n, p in ref_params.items() if p.requires_grad}
    assert_close({n: p.grad for n, p in params.items()}, {n: p.grad for n, p in ref_params.items()}, rtol=1e-4)
    has_params = cfg.name in ("margin", "proxy_anchor", "normalized_softmax", "arcface", "mpn")
    assert bool(params) == has_params


def test_loss_is_a_function_of_seed_and_step_only():
    """Seeded parts (SiMix alphas, distance-weighted mining, rho switches, the MPN's dropout) ignore the global RNG."""
    _, _, labels, _ = setup(drop_path=0.0)
    emb = torch.nn.functional.normalize(torch.randn(len(labels), 24, generator=torch.Generator().manual_seed(0)), dim=1)
    for cfg in (LossConfig(name="rsk_simix"), LossConfig(name="margin", miner="distance", p_switch=0.5),
                LossConfig(name="mpn", mpn_layers=1, mpn_heads=2)):
        loss_fn = make_loss(cfg, labels)
        torch.manual_seed(0)
        a = loss_fn(emb, labels)
        torch.manual_seed(1)
        b = loss_fn(emb, labels)
        set_step(loss_fn, 6)
        c = loss_fn(emb, labels)
        assert a == b and a != c, cfg.name


def test_unknown_loss_name_is_one_line():
    from pipeline.errors import UserError
    with pytest.raises(UserError, match="unknown loss.name=foo; available: rsk, rsk_simix"):
        build_loss(LossConfig(name="foo"), TrainConfig(), [0, 1], 8, 0)
