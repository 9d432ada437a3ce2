"""SiMix from scalar similarities equals materialised mixing a * e_i + (1 - a) * e_j (not re-normalised)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import RecallAtKSiMix, recall_at_k_loss, set_step, simix, simix_pairs

LABELS = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 3])   # unequal classes, unsorted; class 3 has no pair


def embed(n, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def materialised(emb, labels, pairs, alphas):
    mixed = alphas[:, None] * emb[pairs[:, 0]] + (1 - alphas[:, None]) * emb[pairs[:, 1]]
    everything = torch.cat([emb, mixed])
    return everything @ everything.T, torch.cat([labels, labels[pairs[:, 0]]])


def test_all_pairs_within_each_class():
    pairs = simix_pairs(LABELS)
    expected = {(i, j) for i in range(10) for j in range(i + 1, 10) if LABELS[i] == LABELS[j]}
    assert {tuple(p) for p in pairs.tolist()} == expected and len(pairs) == len(expected) == 3 + 6 + 1


def test_fixed_number_per_class_is_seeded():
    g = lambda s: torch.Generator().manual_seed(s)
    pairs = simix_pairs(LABELS, per_class=2, generator=g(0))
    classes = LABELS[pairs[:, 0]]
    assert torch.equal(LABELS[pairs[:, 0]], LABELS[pairs[:, 1]])
    # classes 0 (6 pairs) and 2 (3 pairs) give 2 each; class 1 has only 1 pair.
    assert sorted(classes.tolist()) == [0, 0, 1, 2, 2]
    assert len({tuple(p) for p in pairs.tolist()}) == 5
    assert torch.equal(pairs, simix_pairs(LABELS, per_class=2, generator=g(0)))
    assert any(not torch.equal(pairs, simix_pairs(LABELS, per_class=2, generator=g(s))) for s in range(1, 6))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_equals_materialised_mixing(dtype, tol):
    emb = embed(len(LABELS)).to(dtype)
    pairs = simix_pairs(LABELS)
    alphas = torch.rand(len(pairs), generator=torch.Generator().manual_seed(1), dtype=dtype)
    sim, labels = simix(emb @ emb.T, LABELS, pairs, alphas)
    ref_sim, ref_labels = materialised(emb, LABELS, pairs, alphas)
    assert sim.shape == (20, 20) and torch.equal(labels, ref_labels)
    torch.testing.assert_close(sim, ref_sim, rtol=tol, atol=tol)
    # Virtual samples are not re-normalised: their self-similarity is below 1.
    assert (sim.diagonal()[10:] < 1 - 1e-3).any()


def test_loss_and_gradient_equal_rsk_on_materialised_mixing():
    emb = embed(len(LABELS), seed=2).requires_grad_()
    ref_emb = emb.detach().clone().requires_grad_()
    loss_fn = RecallAtKSiMix(ks=(1, 2, 4, 8), tau_rank=0.05, seed=4)
    set_step(loss_fn, 3)
    loss = loss_fn(emb, LABELS)
    gen = loss_fn.generator()
    pairs = simix_pairs(LABELS, 0, gen)                  # the same draws as the module: pairs, then alphas
    alphas = torch.rand(len(pairs), generator=gen, dtype=torch.float64)
    ref_sim, ref_labels = materialised(ref_emb, LABELS, pairs, alphas)
    ref = recall_at_k_loss(ref_sim, ref_labels, (1, 2, 4, 8), 0.05)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    loss.backward()
    ref.backward()
    assert ref_emb.grad.abs().max() > 1e-3
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-9, atol=1e-12)
