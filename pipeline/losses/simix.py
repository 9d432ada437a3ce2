"""SiMix (Patel, Tolias, Matas 2022): virtual samples mixed from same-class pairs, in similarity space.

A virtual sample v = a * e_i + (1 - a) * e_j (y_i == y_j, a ~ U(0, 1), not re-normalised) has
similarities that follow from scalar similarities alone:

    s(v, x)  = a * s(i, x) + (1 - a) * s(j, x)
    s(v, v') = a' * s(v, i') + (1 - a') * s(v, j')

so the mixed embeddings are never materialised. The result is the similarity matrix over the B
originals followed by the M virtual samples; every row is a query of RS@k.

The extended matrix is built from rows: `mix_rows` gives the virtual samples' rows over the
originals, `mix_columns` appends the virtual columns to any rows. So one part of the queries
(`RecallAtKSiMix.partial`, the loss split across ranks) needs only its own rows: those of its
original queries and of the originals its virtual queries are mixed from.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.losses.recall_at_k import RecallAtK, query_count, share, similarities
from pipeline.losses.seeding import StepSeeded

# Rows per slab of the column mixing: about this many elements of (rows x M) temporaries, kept in cache.
_SLAB_ELEMENTS = 1 << 20


def mix_rows(sim: torch.Tensor, pairs: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """The rows of the virtual samples over the columns of `sim`: a * sim[i] + (1 - a) * sim[j]."""
    return (alphas[:, None] * sim.index_select(0, pairs[:, 0])
            + (1 - alphas)[:, None] * sim.index_select(0, pairs[:, 1]))


class _MixColumns(torch.autograd.Function):
    """rows (R, B) -> (R, B + M), written once, a slab of rows at a time; backward adds each virtual
    column's gradient onto its two originals. Autograd over cat/gather/mul would allocate five
    (R x M) temporaries each way (measured 4x slower at B = 4,000 with every within-class pair)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, i: torch.Tensor, j: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        n_rows, b = rows.shape
        out = rows.new_empty(n_rows, b + len(i))
        out[:, :b] = rows
        slab = max(1, _SLAB_ELEMENTS // max(1, len(i)))
        for start in range(0, n_rows, slab):
            part, virtual = rows[start:start + slab], out[start:start + slab, b:]
            torch.mul(part.index_select(1, i), a, out=virtual)
            virtual.addcmul_(part.index_select(1, j), 1 - a)
        ctx.save_for_backward(i, j, a)
        ctx.b, ctx.slab = b, slab
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        i, j, a = ctx.saved_tensors
        b, slab = ctx.b, ctx.slab
        d_rows = grad[:, :b].clone()
        for start in range(0, len(d_rows), slab):
            virtual, target = grad[start:start + slab, b:], d_rows[start:start + slab]
            target.index_add_(1, i, virtual * a)
            target.index_add_(1, j, virtual * (1 - a))
        return d_rows, None, None, None


def mix_columns(rows: torch.Tensor, pairs: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """(R, B) rows over the originals -> (R, B + M): the virtual samples' columns appended."""
    return _MixColumns.apply(rows, pairs[:, 0], pairs[:, 1], alphas)


def simix(sim: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor,
          alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) similarities (symmetric), (B,) labels, (M, 2) same-class index pairs, (M,) alphas ->
    (B + M, B + M) similarities and (B + M,) labels."""
    a = alphas.to(sim)
    full = mix_columns(torch.cat([sim, mix_rows(sim, pairs, a)]), pairs, a)
    return full, torch.cat([labels, labels[pairs[:, 0]]])


def simix_pairs(labels: torch.Tensor, per_class: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(M, 2) index pairs i < j with labels[i] == labels[j]: all of them (per_class=0, as in the
    paper), or `per_class` of each class drawn without replacement (all of a class that has fewer)."""
    labels = labels.cpu()
    same = labels[:, None] == labels[None, :]
    i, j = torch.triu(same, diagonal=1).nonzero(as_tuple=True)
    if per_class:
        keys = torch.rand(len(i), generator=generator)
        order = torch.argsort(keys)
        order = order[torch.argsort(labels[i][order], stable=True)]      # by class, random within
        cls = labels[i][order]
        first = torch.searchsorted(cls, cls, side="left")                # each class's first position
        keep = order[(torch.arange(len(order)) - first) < per_class].sort().values
        i, j = i[keep], j[keep]
    return torch.stack([i, j], 1)


class RecallAtKSiMix(RecallAtK, StepSeeded):
    """RS@k over the batch plus its SiMix virtual samples; pairs and alphas drawn from (seed, step).
    Every row, original or virtual, is a query; `partial` splits both kinds across ranks."""

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), tau_rank: float = 0.01, tau_count: float = 1.0,
                 include_query_in_rank: bool = False, per_class: int = 0, seed: int = 0, kernel: str = "auto",
                 split_across_ranks: bool = True):
        super().__init__(ks, tau_rank, tau_count, include_query_in_rank, kernel=kernel,
                         split_across_ranks=split_across_ranks)
        self.per_class, self.seed = per_class, seed

    def draw(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's pairs (M, 2) and alphas (M,), float64 (the same on every rank and device)."""
        gen = self.generator()
        pairs = simix_pairs(labels, self.per_class, gen)
        alphas = torch.rand(len(pairs), generator=gen, dtype=torch.float64)
        return pairs.to(labels.device), alphas.to(labels.device)

    def mix(self, sim: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return simix(sim, labels, *self.draw(labels))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim, all_labels = self.mix(similarities(embeddings), labels)
        return self.rows_loss(sim, all_labels, torch.arange(len(all_labels), device=labels.device))

    def partial(self, embeddings: torch.Tensor, labels: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        """The `part`-th share of the originals and the `part`-th share of the virtual samples as
        queries, against all B + M samples; the parts sum to forward(embeddings, labels)."""
        pairs, alphas = self.draw(labels)
        b, device = len(labels), labels.device
        mine, virtual = share(b, part, parts).to(device), share(len(pairs), part, parts).to(device)
        needed = torch.cat([mine, pairs[virtual].flatten()]).unique()   # sorted
        base = similarities(embeddings, needed)                           # the originals' rows it needs
        a = alphas.to(base)
        local_pairs = torch.searchsorted(needed, pairs[virtual])          # their rows in base
        rows = torch.cat([base[torch.searchsorted(needed, mine)], mix_rows(base, local_pairs, a[virtual])])
        all_labels = torch.cat([labels, labels[pairs[:, 0]]])
        own = torch.cat([mine, b + virtual])
        return self.rows_loss(mix_columns(rows, pairs, a), all_labels, own, query_count(all_labels))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_class={self.per_class or 'all pairs'}"
