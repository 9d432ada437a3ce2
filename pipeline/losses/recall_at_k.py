"""Recall@k Surrogate loss (RS@k) of Patel, Tolias, Matas, CVPR 2022.

For a query q with positives P_q = {p : y_p == y_q, p != q} and similarities s_qz:

    rank(q, p) = 1 + sum_{z != p, z != q} sigmoid((s_qz - s_qp) / tau_rank)
    R_k(q)     = min(k, sum_{p in P_q} sigmoid((k - rank(q, p)) / tau_count)) / min(k, |P_q|)
    loss       = mean_{q : |P_q| >= 1} (1 - mean_{k in ks} R_k(q))

With include_query_in_rank=True the query itself also counts in the rank (z = q is kept), as the
authors' released code does. ks larger than B - 1 are clipped to B - 1 (then deduplicated).
Other positives count in the rank of p: the loss wants every positive ranked within the top k.

The loss is a sum over query rows, each against the whole batch (`rsk_rows`), so it splits across
ranks exactly: `RecallAtK.partial` computes the rows of one part of the queries, divided by the
number of queries of the whole batch (pipeline/train/two_pass.py sums the parts). The smooth ranks, the
(pairs x B) part of the cost, come from one of the kernels (`train.rsk_kernel`):

    reference  the first vectorised implementation (`_pair_ranks`: autograd over chunked, checkpointed
               (pairs x B) blocks), kept as the reference the kernels are tested against
    torch      pipeline/losses/rsk_fused.py: cache-sized slabs, one sigmoid pass forward, one sigmoid +
               one multiply pass backward (CPU; also a fallback on GPUs)
    triton     pipeline/losses/rsk_triton.py: the (pairs x B) block stays in registers (GPU)
    auto       triton on CUDA when one tiny Triton launch works, torch otherwise
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config.schema import KERNELS, one_of
from pipeline.losses import rsk_fused
from pipeline.losses.protocol import SplitsAcrossRanks

log = logging.getLogger(__name__)

# A chunk's (pairs x B) block holds about this many elements: bounds the reference's forward intermediate.
_CHUNK_ELEMENTS = 1 << 24


def check_kernel(kernel: str) -> None:
    one_of(kernel, KERNELS, f"train.rsk_kernel={kernel} is unknown; use one of {', '.join(KERNELS)}")


def pick_kernel(kernel: str, device: torch.device) -> str:
    check_kernel(kernel)
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        return "triton" if triton_launches(device) else "torch"
    return "torch"


_launches: dict[str, bool] = {}  # device -> whether Triton launched there (tried once per process)


def triton_launches(device: torch.device) -> bool:
    """Whether one tiny launch of the Triton kernel works on `device`. Triton's first launch compiles
    a C launcher (triton/runtime/build.py: a C compiler and the Python headers), which a minimal
    compute node may lack; `auto` then falls back to the torch kernel with one warning line."""
    if str(device) not in _launches:
        try:
            from pipeline.losses import rsk_triton  # noqa: F401  (Triton ships with CUDA builds of torch)

            one = torch.zeros(1, 2, device=device)
            rsk_triton.smooth_ranks(one, torch.ones(1, 1, dtype=torch.long, device=device), None, 1.0)
            _launches[str(device)] = True
        except Exception as e:  # ImportError, the compiler's CalledProcessError, a driver error...
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            log.warning("train.rsk_kernel=auto: Triton cannot launch on %s (%s: %s); using the torch kernel",
                        device, type(e).__name__, reason)
            _launches[str(device)] = False
    return _launches[str(device)]


class _Gram(torch.autograd.Function):
    """e @ e.T whose backward is one matrix product, (G + G^T) @ e, where autograd would do two."""

    @staticmethod
    def forward(ctx, e: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(e)
        return e @ e.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (e,) = ctx.saved_tensors
        return (grad + grad.T) @ e


def similarities(embeddings: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(R, B) similarities of embeddings[rows] (default: all, the Gram matrix) to all embeddings, in
    float32 even under autocast (see rsk_rows)."""
    with torch.autocast(embeddings.device.type, enabled=False):
        e = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        return _Gram.apply(e) if rows is None else e[rows] @ e.T


def share(n: int, part: int, parts: int) -> torch.Tensor:
    """Indices of the `part`-th of `parts` contiguous, near-equal shares of range(n)."""
    return torch.arange(part * n // parts, (part + 1) * n // parts)


def query_count(labels: torch.Tensor) -> int:
    """Queries of a batch in which every sample is a query: the samples whose class has another sample."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def _pair_ranks(sim: torch.Tensor, q: torch.Tensor, p: torch.Tensor, own: torch.Tensor, tau_rank: float,
                include_query: bool) -> torch.Tensor:
    """Reference: smooth rank of positive column p among row q, for a chunk of (q, p) pairs (own: q's column)."""
    rows = sim[q]                                              # (pairs, B)
    sig = torch.sigmoid((rows - rows.gather(1, p[:, None])) / tau_rank)
    sig = sig.scatter(1, p[:, None], 0.0)                      # p does not outrank itself
    if not include_query:
        sig = sig.scatter(1, own[:, None], 0.0)
    return 1.0 + sig.sum(1)


def _reference_counts(sim, labels, rows, ks_t, tau_rank, tau_count, include_query, pair_chunk):
    """(R, len(ks)) soft counts of positives within the top k, and (R,) numbers of positives, from
    the (q, p) pairs of a (R, C) positive mask."""
    pos = labels[rows][:, None] == labels[None, :]
    pos[torch.arange(len(rows), device=sim.device), rows] = False
    q_idx, p_idx = pos.nonzero(as_tuple=True)
    chunk = pair_chunk or max(1, _CHUNK_ELEMENTS // sim.shape[1])
    counts = sim.new_zeros(sim.shape[0], len(ks_t))
    for s in range(0, len(q_idx), chunk):
        q, p = q_idx[s:s + chunk], p_idx[s:s + chunk]
        # Checkpointed: backward recomputes the (pairs x B) block instead of storing it per chunk.
        rank = checkpoint(_pair_ranks, sim, q, p, rows[q], tau_rank, include_query, use_reentrant=False)
        counts = counts.index_add(0, q, torch.sigmoid((ks_t - rank[:, None]) / tau_count))
    return counts, pos.sum(1)


def padded_positives(labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cols (R, n): for each query row (its own column rows[r]), the columns of the other samples of
    its class, padded with its own column up to n = the largest count; filled (R, n) marks the real ones.
    From the label-sorted order, not from a (R, C) mask."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    own = labels[rows]
    start = torch.searchsorted(sorted_labels, own)
    count = torch.searchsorted(sorted_labels, own, right=True) - start - 1
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order), device=order.device)
    own_slot = position[rows] - start
    slot = torch.arange(int(count.max()) if len(rows) else 0, device=labels.device)
    index = start[:, None] + slot + (slot >= own_slot[:, None])          # skip the query's own slot
    filled = slot < count[:, None]
    cols = torch.where(filled, order[index.clamp_max(len(order) - 1)], rows[:, None])
    return cols, filled


def _kernel_counts(sim, labels, rows, ks_t, tau_rank, tau_count, include_query, kernel, block):
    cols, filled = padded_positives(labels, rows)
    own = None if include_query else rows
    if kernel == "triton":
        from pipeline.losses import rsk_triton

        rank = rsk_triton.smooth_ranks(sim, cols, own, tau_rank)
    else:
        rank = rsk_fused.smooth_ranks(sim, cols, own, tau_rank, block)
    # Padded slots get a zero weight, hence a zero gradient.
    counts = (torch.sigmoid((ks_t - rank[..., None]) / tau_count) * filled[..., None]).sum(1)
    return counts, filled.sum(1)


def rsk_rows(sim: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8, 16),
             tau_rank: float = 0.01, tau_count: float = 1.0, include_query_in_rank: bool = False,
             queries: int | None = None, kernel: str = "auto", block: int | None = None,
             pair_chunk: int | None = None) -> torch.Tensor:
    """RS@k summed over some query rows and divided by `queries`.

    sim (R, C): the rows' similarities to all C samples of the batch (labels (C,)); rows (R,): each
    row's own column. queries: the number of queries of the whole loss (the denominator); default
    the queries among these rows, which makes this the loss of these rows alone.
    """
    # float32 at least: with tau_rank ~0.01, half-precision similarities are too coarse.
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    rows = rows.to(sim.device)
    ks_t = torch.tensor(list(dict.fromkeys(min(int(k), sim.shape[1] - 1) for k in ks)),
                        dtype=sim.dtype, device=sim.device)
    kernel = pick_kernel(kernel, sim.device)
    if kernel == "reference":
        counts, n_pos = _reference_counts(sim, labels, rows, ks_t, tau_rank, tau_count, include_query_in_rank,
                                          pair_chunk)
    else:
        counts, n_pos = _kernel_counts(sim, labels, rows, ks_t, tau_rank, tau_count, include_query_in_rank,
                                       kernel, block)
    valid = n_pos > 0
    if not bool(valid.any()):
        return sim.sum() * 0.0  # keeps the graph connected for callers that always backward
    # Select valid queries before dividing: 0/0 rows would put NaN into the gradient.
    counts, n_pos = counts[valid], n_pos[valid, None].to(sim.dtype)
    recall = torch.minimum(counts, ks_t) / torch.minimum(n_pos, ks_t)
    return (1.0 - recall.mean(1)).sum() / (queries or int(valid.sum()))


def recall_at_k_loss(sim: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 2, 4, 8, 16),
                     tau_rank: float = 0.01, tau_count: float = 1.0,
                     include_query_in_rank: bool = False, query_mask: torch.Tensor | None = None,
                     pair_chunk: int | None = None, kernel: str = "auto") -> torch.Tensor:
    """RS@k on a (B, B) similarity matrix; rows are queries, columns the database.

    query_mask: optional (B,) bool, rows allowed to act as queries. pair_chunk: (q, p) pairs per
    chunk of the reference kernel; default keeps a chunk's (pairs x B) block at ~16M elements.
    """
    if query_mask is None:
        rows = torch.arange(sim.shape[0], device=sim.device)
    else:
        rows = query_mask.to(torch.bool).nonzero()[:, 0]
        sim = sim[rows]
    return rsk_rows(sim, labels, rows, ks, tau_rank, tau_count, include_query_in_rank, kernel=kernel,
                    pair_chunk=pair_chunk)


class RecallAtK(nn.Module, SplitsAcrossRanks):
    """RS@k on L2-normalised embeddings (B, D) and integer labels (B,); see module docstring.

    split_across_ranks: the two-pass step may call `partial` on each rank instead of the whole loss
    (exact: a sum over queries with a known global denominator)."""

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), tau_rank: float = 0.01,
                 tau_count: float = 1.0, include_query_in_rank: bool = False,
                 pair_chunk: int | None = None, kernel: str = "auto", split_across_ranks: bool = True):
        super().__init__()
        check_kernel(kernel)
        self.ks, self.tau_rank, self.tau_count = tuple(ks), tau_rank, tau_count
        self.include_query_in_rank, self.pair_chunk = include_query_in_rank, pair_chunk
        self.kernel, self.split_across_ranks = kernel, split_across_ranks

    def rows_loss(self, sim: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                  queries: int | None = None) -> torch.Tensor:
        return rsk_rows(sim, labels, rows, self.ks, self.tau_rank, self.tau_count, self.include_query_in_rank,
                        queries, self.kernel, pair_chunk=self.pair_chunk)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.rows_loss(similarities(embeddings), labels, torch.arange(len(labels), device=labels.device))

    def partial(self, embeddings: torch.Tensor, labels: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        """The share of the loss of the `part`-th of `parts` contiguous shares of the queries, each
        against the whole batch; the parts sum to forward(embeddings, labels)."""
        rows = share(len(labels), part, parts).to(labels.device)
        return self.rows_loss(similarities(embeddings, rows), labels, rows, query_count(labels))

    def extra_repr(self) -> str:
        return (f"ks={self.ks}, tau_rank={self.tau_rank}, tau_count={self.tau_count}, "
                f"include_query_in_rank={self.include_query_in_rank}, kernel={self.kernel}")
