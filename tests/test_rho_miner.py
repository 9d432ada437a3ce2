"""Roth et al.'s distance-weighted miner and rho rule against an independent re-implementation of
batchminer/rho_distance.py (numpy, written from the authors' file), and the pml losses on its
triplets against Roth's criteria (criteria/margin.py, triplet.py, contrastive.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig
from pipeline.losses import build_loss, set_step
from pipeline.losses.rho import DistanceMiner, inverse_sphere_density

# 3 classes x 4; two negatives placed close to anchor 0 (distance < 0.5) so the lower cutoff matters.
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])


def embeddings(dim=16, seed=0):
    e = torch.randn(12, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    e[4] = e[0] + 0.05 * e[4]
    e[8] = e[0] + 0.1 * e[8]
    return F.normalize(e, dim=1)


def roth_probabilities(batch: np.ndarray, labels: np.ndarray, lower_cutoff=0.5) -> np.ndarray:
    """rho_distance.py:16 and :50-66, row by row: pdist (eps 1e-4), clamp at the lower cutoff, the
    negated log density of distances on the unit sphere, same class zeroed, normalised."""
    prod = batch @ batch.T
    norm = np.diag(prod)[:, None]
    dist = np.sqrt(np.clip(np.clip(norm + norm.T - 2 * prod, 0, None), 1e-4, None))
    dist = np.clip(dist, lower_cutoff, None)
    dim = batch.shape[1]
    out = np.zeros_like(dist)
    for i in range(len(batch)):
        d = dist[i]
        log_q = (2.0 - dim) * np.log(d) - (dim - 3) / 2 * np.log(1.0 - 0.25 * d ** 2)
        log_q[labels == labels[i]] = 0
        q = np.exp(log_q - log_q.max())
        q[labels == labels[i]] = 0
        out[i] = q / q.sum()
    return out


def test_negative_probabilities_are_roths():
    e = embeddings()
    ours = inverse_sphere_density(e, LABELS).numpy()
    theirs = roth_probabilities(e.numpy(), LABELS.numpy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    # The fixture exercises the cutoff: without it, anchor 0's probabilities would differ.
    assert not np.allclose(roth_probabilities(e.numpy(), LABELS.numpy(), lower_cutoff=0.0)[0], theirs[0], atol=1e-3)


def draw(miner, e, n, seed=0):
    torch.manual_seed(seed)
    return [miner(e, LABELS) for _ in range(n)]


def assert_drawn_from(counts: np.ndarray, probs: np.ndarray) -> None:
    """Counts within 5 standard deviations of n * probs; outcomes expected fewer than 5 times pooled."""
    n = counts.sum()
    rare = probs * n < 5
    pooled_counts = np.r_[counts[~rare], counts[rare].sum()]
    pooled_probs = np.r_[probs[~rare], probs[rare].sum()]
    expected, sd = n * pooled_probs, np.sqrt(n * pooled_probs * (1 - pooled_probs))
    assert (np.abs(pooled_counts - expected) <= 5 * sd + 3).all(), (counts, n * probs)


def test_rho_rule_per_anchor_and_the_distance_weighted_negatives():
    p, n = 0.35, 3000
    e = embeddings()
    draws = draw(DistanceMiner(p_switch=p), e, n)
    a, pos, neg = (torch.stack([d[i] for d in draws]) for i in range(3))   # (n, 12): one triplet per anchor
    assert (a == torch.arange(12)).all()
    switched = pos == a
    # The switch happens with probability p for every anchor (5 standard deviations).
    rate = switched.double().mean(0)
    assert (rate - p).abs().max() < 5 * (p * (1 - p) / n) ** 0.5, rate
    # A switched triplet is (a, a, n) with n of a's class, n != a, uniform over the 3 others.
    assert (LABELS[neg[switched]] == LABELS[a[switched]]).all() and (neg[switched] != a[switched]).all()
    # Otherwise p is a uniform other sample of a's class, n a negative drawn by Roth's probabilities.
    kept = ~switched
    assert (LABELS[pos[kept]] == LABELS[a[kept]]).all() and (pos[kept] != a[kept]).all()
    assert (LABELS[neg[kept]] != LABELS[a[kept]]).all()
    probs = roth_probabilities(e.numpy(), LABELS.numpy())
    for anchor in range(12):
        assert_drawn_from(np.bincount(neg[kept[:, anchor], anchor].numpy(), minlength=12), probs[anchor])
        chosen = pos[kept[:, anchor], anchor]
        same = [j for j in range(12) if LABELS[j] == LABELS[anchor] and j != anchor]
        share = np.array([(chosen == j).double().mean().item() for j in same])
        assert np.abs(share - 1 / 3).max() < 5 * np.sqrt(2 / 9 / len(chosen)), (anchor, share)


def test_p_zero_never_switches_and_p_one_always_does():
    e = embeddings()
    for a, p, n in draw(DistanceMiner(0.0), e, 50):
        assert (p != a).all() and (LABELS[n] != LABELS[a]).all()
    for a, p, n in draw(DistanceMiner(1.0), e, 50):
        assert (p == a).all() and (LABELS[n] == LABELS[a]).all() and (n != a).all()


def test_anchors_alone_in_their_class_are_skipped():
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    a, p, n = DistanceMiner(0.5)(F.normalize(torch.randn(6, 8), dim=1), labels)
    assert a.tolist() == [0, 1, 3, 4]


# The pml losses on the miner's triplets, as recipe=roth configures them, against Roth's criteria.
def roth_margin(e, labels, triplets, beta, margin=0.2):
    a, p, n = triplets
    d_ap = ((e[a] - e[p]).pow(2).sum(1) + 1e-8).sqrt()
    d_an = ((e[a] - e[n]).pow(2).sum(1) + 1e-8).sqrt()
    b = beta[labels[a]]
    pos, neg = F.relu(d_ap - b + margin), F.relu(b - d_an + margin)
    return (pos + neg).sum() / ((pos > 0).sum() + (neg > 0).sum())


def roth_triplet(e, labels, triplets, margin=0.2):
    a, p, n = triplets
    return F.relu((e[a] - e[p]).pow(2).sum(1) - (e[a] - e[n]).pow(2).sum(1) + margin).mean()


def roth_contrastive(e, labels, triplets, neg_margin=1.0):
    a, p, n = triplets
    return F.relu((e[a] - e[p]).norm(dim=1)).mean() + F.relu(neg_margin - (e[a] - e[n]).norm(dim=1)).mean()


@pytest.mark.parametrize("cfg, reference", [
    (LossConfig(name="margin", miner="distance", p_switch=0.35, beta=1.2, margin=0.2), roth_margin),
    (LossConfig(name="triplet", miner="distance", p_switch=0.35, margin=0.2, distance_power=2, reduction="mean"),
     roth_triplet),
    (LossConfig(name="contrastive", miner="distance", p_switch=0.35, margin=1.0, reduction="mean"), roth_contrastive),
])
def test_pml_losses_on_the_miner_are_roths_criteria(cfg, reference):
    e = embeddings(dim=16, seed=3).float()
    loss_fn = build_loss(cfg, None, LABELS.tolist(), 16, seed=7)
    set_step(loss_fn, 4)
    with loss_fn.rng(e.device, salt=1):  # the miner's draws, as MetricLoss makes them
        triplets = loss_fn.miner(e, LABELS)
    assert (triplets[1] == triplets[0]).any(), "vacuous: no switched triplet"
    extra = (loss_fn.loss.beta.detach(),) if cfg.name == "margin" else ()
    expected = reference(e.double(), LABELS, triplets, *extra)
    torch.testing.assert_close(loss_fn(e, LABELS).double(), expected, rtol=1e-5, atol=1e-6)


def test_seeded_by_seed_and_step():
    e = embeddings().float()
    loss_fn = build_loss(LossConfig(name="margin", miner="distance", p_switch=0.5), None, LABELS.tolist(), 16, seed=1)

    def triplets(step):
        set_step(loss_fn, step)
        with loss_fn.rng(e.device, salt=1):
            return torch.cat(loss_fn.miner(e, LABELS))

    assert torch.equal(triplets(3), triplets(3)) and not torch.equal(triplets(3), triplets(4))
