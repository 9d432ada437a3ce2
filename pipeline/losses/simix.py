"""SiMix (Patel, Tolias, Matas 2022): virtual samples mixed from same-class pairs, in similarity space.

A virtual sample v = a * e_i + (1 - a) * e_j (y_i == y_j, a ~ U(0, 1), not re-normalised) has
similarities that follow from scalar similarities alone:

    s(v, x)  = a * s(i, x) + (1 - a) * s(j, x)
    s(v, v') = a' * s(v, i') + (1 - a') * s(v, j')

so the mixed embeddings are never materialised. The result is the similarity matrix over the B
originals followed by the M virtual samples; every row is a query of RS@k.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.losses.recall_at_k import recall_at_k_loss
from pipeline.losses.seeding import StepSeeded


def simix(sim: torch.Tensor, labels: torch.Tensor, pairs: torch.Tensor,
          alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) similarities, (B,) labels, (M, 2) same-class index pairs, (M,) alphas ->
    (B + M, B + M) similarities and (B + M,) labels."""
    i, j = pairs[:, 0], pairs[:, 1]
    a = alphas.to(sim)
    to_originals = a[:, None] * sim[i] + (1 - a)[:, None] * sim[j]                      # (M, B)
    between = to_originals[:, i] * a[None, :] + to_originals[:, j] * (1 - a)[None, :]   # (M, M)
    full = torch.cat([torch.cat([sim, to_originals.T], 1), torch.cat([to_originals, between], 1)])
    return full, torch.cat([labels, labels[i]])


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


class RecallAtKSiMix(nn.Module, StepSeeded):
    """RS@k over the batch plus its SiMix virtual samples; pairs and alphas drawn from (seed, step)."""

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), tau_rank: float = 0.01, tau_count: float = 1.0,
                 include_query_in_rank: bool = False, per_class: int = 0, seed: int = 0):
        super().__init__()
        self.ks, self.tau_rank, self.tau_count = tuple(ks), tau_rank, tau_count
        self.include_query_in_rank, self.per_class, self.seed = include_query_in_rank, per_class, seed

    def mix(self, sim: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.generator()
        pairs = simix_pairs(labels, self.per_class, gen)
        alphas = torch.rand(len(pairs), generator=gen, dtype=torch.float64)
        return simix(sim, labels, pairs.to(sim.device), alphas.to(sim.device))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embeddings.device.type, enabled=False):
            e = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            sim, all_labels = self.mix(e @ e.T, labels)
        return recall_at_k_loss(sim, all_labels, self.ks, self.tau_rank, self.tau_count, self.include_query_in_rank)

    def extra_repr(self) -> str:
        return f"ks={self.ks}, tau_rank={self.tau_rank}, per_class={self.per_class or 'all pairs'}"
