"""Recall@k Surrogate loss (RS@k) of Patel, Tolias, Matas, CVPR 2022.

For a query q with positives P_q = {p : y_p == y_q, p != q} and similarities s_qz:

    rank(q, p) = 1 + sum_{z != p, z != q} sigmoid((s_qz - s_qp) / tau_rank)
    R_k(q)     = min(k, sum_{p in P_q} sigmoid((k - rank(q, p)) / tau_count)) / min(k, |P_q|)
    loss       = mean_{q : |P_q| >= 1} (1 - mean_{k in ks} R_k(q))

With include_query_in_rank=True the query itself also counts in the rank (z = q is kept), as the
authors' released code does. ks larger than B - 1 are clipped to B - 1 (then deduplicated).
Other positives count in the rank of p: the loss wants every positive ranked within the top k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# A chunk's (pairs x B) block holds about this many elements: bounds the forward intermediate.
_CHUNK_ELEMENTS = 1 << 24


def _pair_ranks(sim: torch.Tensor, q: torch.Tensor, p: torch.Tensor, tau_rank: float,
                include_query: bool) -> torch.Tensor:
    """Smooth rank of positive p among the row of query q, for a chunk of (q, p) pairs."""
    rows = sim[q]                                              # (pairs, B)
    sig = torch.sigmoid((rows - rows.gather(1, p[:, None])) / tau_rank)
    sig = sig.scatter(1, p[:, None], 0.0)                      # p does not outrank itself
    if not include_query:
        sig = sig.scatter(1, q[:, None], 0.0)
    return 1.0 + sig.sum(1)


def recall_at_k_loss(sim: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8, 16),
                     tau_rank: float = 0.01, tau_count: float = 1.0,
                     include_query_in_rank: bool = False, query_mask: torch.Tensor | None = None,
                     pair_chunk: int | None = None) -> torch.Tensor:
    """RS@k on a (B, B) similarity matrix; rows are queries, columns the database.

    query_mask: optional (B,) bool, rows allowed to act as queries (e.g. SiMix keeps virtual
    samples in the database only). pair_chunk: (q, p) pairs per chunk; default keeps a chunk's
    (pairs x B) block at ~16M elements.
    """
    # float32 at least: with tau_rank ~0.01, half-precision similarities are too coarse.
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    b = sim.shape[1]
    pos = labels[:, None] == labels[None, :]
    pos.fill_diagonal_(False)
    if query_mask is not None:
        pos &= query_mask[:, None].to(torch.bool)
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return sim.sum() * 0.0  # keeps the graph connected for callers that always backward
    ks_t = torch.tensor(list(dict.fromkeys(min(int(k), b - 1) for k in ks)),
                        dtype=sim.dtype, device=sim.device)

    q_idx, p_idx = pos.nonzero(as_tuple=True)
    chunk = pair_chunk or max(1, _CHUNK_ELEMENTS // b)
    counts = sim.new_zeros(sim.shape[0], len(ks_t))
    for s in range(0, len(q_idx), chunk):
        q, p = q_idx[s:s + chunk], p_idx[s:s + chunk]
        # Checkpointed: backward recomputes the (pairs x B) block instead of storing it per chunk.
        rank = checkpoint(_pair_ranks, sim, q, p, tau_rank, include_query_in_rank,
                          use_reentrant=False)
        counts = counts.index_add(0, q, torch.sigmoid((ks_t - rank[:, None]) / tau_count))

    # Select valid queries before dividing: 0/0 rows would put NaN into the gradient.
    counts, n_pos = counts[valid], n_pos[valid, None].to(sim.dtype)
    recall = torch.minimum(counts, ks_t) / torch.minimum(n_pos, ks_t)
    return (1.0 - recall.mean(1)).mean()


class RecallAtK(nn.Module):
    """RS@k on L2-normalised embeddings (B, D) and integer labels (B,); see module docstring."""

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), tau_rank: float = 0.01,
                 tau_count: float = 1.0, include_query_in_rank: bool = False,
                 pair_chunk: int | None = None):
        super().__init__()
        self.ks, self.tau_rank, self.tau_count = tuple(ks), tau_rank, tau_count
        self.include_query_in_rank, self.pair_chunk = include_query_in_rank, pair_chunk

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Similarities in float32 even under autocast (see recall_at_k_loss).
        with torch.autocast(embeddings.device.type, enabled=False):
            e = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            sim = e @ e.T
        return recall_at_k_loss(sim, labels, self.ks, self.tau_rank, self.tau_count,
                                self.include_query_in_rank, pair_chunk=self.pair_chunk)

    def extra_repr(self) -> str:
        return (f"ks={self.ks}, tau_rank={self.tau_rank}, tau_count={self.tau_count}, "
                f"include_query_in_rank={self.include_query_in_rank}")
