"""pipeline/eval/positives_beyond_k.py (issue 40) against a dense computation written out pair by pair,
and against a batch whose ranks are known by construction."""
import numpy as np
import pytest

from pipeline.data.sampler import PKSampler
from pipeline.eval.positives_beyond_k import positive_ranks, share_beyond_k


def _dense_ranks(x, labels, include_query):
    """Loop over every (q, p, z): the definition, one comparison at a time."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    ranks = []
    for q in range(len(x)):
        for p in range(len(x)):
            if p == q or labels[p] != labels[q]:
                continue
            s_qp = float(x[q] @ x[p])
            ranks.append(1 + sum(float(x[q] @ x[z]) > s_qp for z in range(len(x))
                                 if z != p and (include_query or z != q)))
    return np.array(ranks)


@pytest.mark.parametrize("include_query", [False, True])
def test_ranks_equal_the_dense_definition(include_query):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4)[rng.permutation(24)]
    x = rng.normal(size=(24, 5)) * rng.uniform(0.5, 3, size=(24, 1))   # unnormalised: cosine is used
    ranks = positive_ranks(x, labels, include_query)
    assert np.array_equal(ranks, _dense_ranks(x, labels, include_query))
    assert len(ranks) == 6 * 4 * 3


def test_share_over_sampler_batches_equals_the_dense_count():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(40), 5)
    x = rng.normal(size=(200, 8))
    sampler = PKSampler(labels, 32, 4, seed=3)
    batches = [sampler.batch(step) for step in range(3)]
    k = 4
    dense = np.concatenate([_dense_ranks(x[b], labels[b], True) for b in batches])
    assert share_beyond_k(x, labels, batches, k, include_query=True) == pytest.approx((dense > k).mean(), abs=0)
    assert 0 < (dense > k).mean() < 1


def test_known_ranks():
    """Two tight classes far apart: every positive is within the top 1 (or 2 with the query counted)."""
    x = np.array([[1, 0.01], [1, -0.01], [-0.01, 1], [0.01, 1]])
    labels = np.array([0, 0, 1, 1])
    assert positive_ranks(x, labels).tolist() == [1, 1, 1, 1]
    assert positive_ranks(x, labels, include_query=True).tolist() == [2, 2, 2, 2]
    assert share_beyond_k(x, labels, [np.arange(4)], k=1, include_query=True) == 1.0
    with pytest.raises(ValueError, match="no \\(query, positive\\) pair"):
        share_beyond_k(x, labels, [np.array([0, 2])], k=1)
