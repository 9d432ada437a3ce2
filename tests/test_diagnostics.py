"""pipeline.eval.diagnostics against direct computations: a full SVD, and every pair of points."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval import diagnostics
from pipeline.eval.diagnostics import embedding_diagnostics, singular_values, spectral_decay


def data(rng, sizes, dim=12):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.standard_normal((len(sizes), dim))[labels] + 0.7 * rng.standard_normal((len(labels), dim))
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm] * 10 + 3   # labels need not be 0..C-1


def cosine_distance(a, b):
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    return 1.0 - float(a @ b)


def direct(x, labels):
    """Roth et al.'s quantities by explicit SVD and explicit loops over pairs."""
    x = x.astype(np.float64)
    s = np.linalg.svd(x, compute_uv=False)
    spectrum = s / s.sum()
    uniform = np.full(len(s), 1.0 / len(s))
    rho = float(np.sum(uniform * np.log(uniform / spectrum)))
    intra, centres = [], []
    for c in np.unique(labels):
        members = x[labels == c]
        units = members / np.linalg.norm(members, axis=1, keepdims=True)
        centre = units.mean(axis=0)
        centres.append(centre / np.linalg.norm(centre))
        if len(members) >= 2:
            intra.append(np.mean([cosine_distance(a, b) for i, a in enumerate(members)
                                  for j, b in enumerate(members) if i != j]))
    inter = np.mean([cosine_distance(a, b) for i, a in enumerate(centres) for j, b in enumerate(centres) if i != j])
    return {"rho": rho, "pi_intra": float(np.mean(intra)), "pi_inter": float(inter),
            "pi_ratio": float(np.mean(intra) / inter)}


@pytest.mark.parametrize("block_rows", [1 << 16, 7])
def test_matches_direct_computation(monkeypatch, block_rows):
    monkeypatch.setattr(diagnostics, "_BLOCK_ROWS", block_rows)
    rng = np.random.default_rng(0)
    x, labels = data(rng, [1, 2, 5, 9, 3, 1, 14, 6])   # two singleton classes
    ours, expected = embedding_diagnostics(x, labels), direct(x, labels)
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_singular_values_when_rows_fewer_than_dims():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 9)).astype(np.float32)
    np.testing.assert_allclose(singular_values(x), np.linalg.svd(x.astype(np.float64), compute_uv=False),
                               rtol=1e-6)


def test_rho_zero_for_flat_spectrum_and_grows_with_decay():
    assert spectral_decay(np.ones(8)) == pytest.approx(0.0, abs=1e-15)
    assert spectral_decay(np.array([4.0, 2.0, 1.0, 0.5])) > spectral_decay(np.array([2.0, 1.5, 1.2, 1.0])) > 0
    assert spectral_decay(np.array([1.0, 0.0])) == float("inf")
    # An orthogonal matrix has all singular values equal: rho = 0.
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((6, 6)))
    assert embedding_diagnostics(q, np.arange(6) // 2)["rho"] == pytest.approx(0.0, abs=1e-6)


def test_tight_classes_have_small_ratio():
    rng = np.random.default_rng(3)
    centres = np.eye(4)
    labels = np.repeat(np.arange(4), 10)
    tight = centres[labels] + 0.01 * rng.standard_normal((40, 4))
    loose = centres[labels] + 0.5 * rng.standard_normal((40, 4))
    assert embedding_diagnostics(tight, labels)["pi_ratio"] < 0.01 < embedding_diagnostics(loose, labels)["pi_ratio"]


def test_mismatched_labels_raise():
    with pytest.raises(ValueError, match="do not match"):
        embedding_diagnostics(np.ones((4, 3)), np.arange(3))
