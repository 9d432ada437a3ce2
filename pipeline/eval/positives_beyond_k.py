"""The share of (query, positive) pairs of training batches whose positive ranks beyond k (issue 40).

RS@k's count of positive p for query q is sigmoid((k - rank(q, p)) / tau_count): a positive whose
rank in the batch is well beyond k gets almost no gradient. In a larger batch more positives fall
there (more samples can outrank them), the more so with a weak encoder. This measures that share with
the hard rank, the limit tau_rank -> 0 of the loss's smooth one (pipeline/losses/recall_at_k.py):

    rank(q, p) = 1 + #{z in the batch : z != p, z != q, s_qz > s_qp}     (+1 with the query counted,
                                                                         include_query: s_qq > s_qp)

over cosine similarities (the embeddings are L2-normalised here), every ordered pair of distinct
samples of one class being a (query, positive) pair; ties do not outrank. Batches are index arrays
into the embeddings, e.g. the training sampler's batches of one epoch (PKSampler.batch(step)).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_ELEMENTS = 1 << 24  # (pairs x batch) comparisons held at once


def positive_ranks(x: np.ndarray, labels: np.ndarray, include_query: bool = False) -> np.ndarray:
    """The hard rank of every (query, positive) pair of one batch, x (B, D), in row-major pair order."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"embeddings {x.shape} and labels {labels.shape} do not match")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    q, p = np.nonzero(same)
    ranks = np.empty(len(q), dtype=np.int64)
    chunk = max(1, _ELEMENTS // max(1, len(x)))
    for s in range(0, len(q), chunk):
        qs, ps = q[s:s + chunk], p[s:s + chunk]
        rows = sim[qs]
        above = rows > sim[qs, ps][:, None]          # p never outranks itself (strict)
        if not include_query:
            above[np.arange(len(qs)), qs] = False
        ranks[s:s + chunk] = 1 + above.sum(1)
    return ranks


def share_beyond_k(x: np.ndarray, labels: np.ndarray, batches: Iterable[np.ndarray], k: int = 16,
                   include_query: bool = False) -> float:
    """The share of all (query, positive) pairs of `batches` (index arrays into x) ranked beyond k."""
    beyond = pairs = 0
    for batch in batches:
        ranks = positive_ranks(np.asarray(x)[batch], np.asarray(labels)[batch], include_query)
        beyond += int((ranks > k).sum())
        pairs += len(ranks)
    if not pairs:
        raise ValueError("the batches hold no (query, positive) pair: no class appears twice in a batch")
    return beyond / pairs
