"""Embedding-space diagnostics of Roth et al. (ICML 2020, "Revisiting training strategies and
generalization performance in deep metric learning"): spectral decay and intra/inter-class distances.

    d = embedding_diagnostics(embeddings, labels)   # {"rho", "pi_intra", "pi_inter", "pi_ratio", ...}

What is computed (x: the (n, dim) embeddings as given, not centred, as in the authors' code):

    singular values  s_1 >= ... >= s_m of x, m = min(n, dim), from the eigenvalues of x^T x
                     (accumulated in float64 over row blocks: memory dim x dim, any n)
    spectrum         S = s / sum(s), the normalised singular-value spectrum
    rho              KL(U || S) = sum_i (1/m) log((1/m) / S_i), U uniform over the m values:
                     0 when every direction carries the same energy, larger as the spectrum
                     decays (a few directions dominate); inf if x has rank below m
    pi_intra         mean over classes with >= 2 images of the mean cosine distance (1 - cos)
                     between two different images of that class
    pi_inter         mean cosine distance between two different class centres, a class centre
                     being the L2-normalised mean of its L2-normalised embeddings
    pi_ratio         pi_intra / pi_inter (higher: classes spread wider relative to their spacing)

Roth et al. define pi_intra over every pair of a class and pi_inter over class means; their code
averages the per-class means (as here) and uses the cosine distance of normalised centres (as here).
Singleton classes have no pair: they are left out of pi_intra (the authors' code substitutes the
largest class value instead) but their centres count in pi_inter. The cosine sums use
sum_{i != j} u_i . u_j = |sum_i u_i|^2 - m for unit vectors, so no pairwise matrix is formed.
"""
from __future__ import annotations

import numpy as np

_BLOCK_ROWS = 1 << 16


def singular_values(x: np.ndarray) -> np.ndarray:
    """Singular values of x, largest first (min(n, dim) of them)."""
    gram = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(x), _BLOCK_ROWS):
        block = np.asarray(x[start:start + _BLOCK_ROWS], dtype=np.float64)
        gram += block.T @ block
    eig = np.linalg.eigvalsh(gram)[::-1][:min(x.shape)]
    return np.sqrt(np.clip(eig, 0.0, None))


def spectral_decay(s: np.ndarray) -> float:
    """rho = KL(uniform || normalised spectrum)."""
    spectrum = s / s.sum()
    if (spectrum <= 0).any():
        return float("inf")
    m = len(spectrum)
    return float(np.sum((1.0 / m) * np.log((1.0 / m) / spectrum)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def class_distances(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """pi_intra, pi_inter, pi_ratio (cosine distances; see the module doc)."""
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), x.shape[1]))
    for start in range(0, len(x), _BLOCK_ROWS):
        np.add.at(sums, inverse[start:start + _BLOCK_ROWS], _unit(x[start:start + _BLOCK_ROWS]))
    pairs = counts >= 2
    m = counts[pairs]
    mean_cos = ((sums[pairs] ** 2).sum(axis=1) - m) / (m * (m - 1))
    intra = float(np.mean(1.0 - mean_cos)) if pairs.any() else float("nan")
    centres = _unit(sums)
    k = len(centres)
    inter = float(1.0 - ((centres.sum(axis=0) ** 2).sum() - k) / (k * (k - 1))) if k >= 2 else float("nan")
    return {"pi_intra": intra, "pi_inter": inter, "pi_ratio": intra / inter if inter > 0 else float("nan")}


def embedding_diagnostics(x, labels) -> dict[str, float]:
    """rho, pi_intra, pi_inter, pi_ratio of (n, dim) embeddings x with integer labels."""
    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"embeddings {x.shape} and labels {labels.shape} do not match")
    return {"rho": spectral_decay(singular_values(x)), **class_distances(x, labels)}
