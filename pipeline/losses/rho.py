"""Roth et al.'s rho-regularisation (Revisiting Training Strategies and Generalization Performance in
Deep Metric Learning, ICML 2020) as a miner for the tuple losses.

Ranking losses pull every class into a tight cluster and so compress the embedding space to few
directions, which hurts generalisation to unseen classes. Rho-regularisation keeps some
intra-class spread: the rule here is, for each negative of the base miner's output (n of a
triplet (a, p, n), or of a negative pair (a, n)), independently with probability p_switch,
replace n by a sample of a's own class other than a, drawn uniformly; the loss then pushes that
same-class sample away from the anchor as if it were a negative. Anchors whose class has no other
sample keep their negative. Draws come from (seed, step), identical on every rank.
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn

from pipeline.losses.seeding import StepSeeded


class RhoMiner(nn.Module, StepSeeded):
    """Wraps a pytorch-metric-learning miner (None: all pairs) and switches negatives to positives."""

    def __init__(self, base: nn.Module | None, p_switch: float, seed: int = 0):
        super().__init__()
        self.base, self.p_switch, self.seed = base, p_switch, seed

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.rng(embeddings.device, salt=1):   # the base miner may sample (distance weighted)
            tuples = self.base(embeddings, labels) if self.base is not None else lmu.get_all_pairs_indices(labels)
        if self.p_switch <= 0:
            return tuples
        anchors, negatives = (tuples[0], tuples[2]) if len(tuples) == 3 else (tuples[2], tuples[3])
        switched = switch_negatives(anchors, negatives, labels, self.p_switch, self.generator(salt=2))
        return (*tuples[:2], switched) if len(tuples) == 3 else (*tuples[:3], switched)


def switch_negatives(anchors: torch.Tensor, negatives: torch.Tensor, labels: torch.Tensor, p_switch: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Each negative, with probability p_switch, becomes a uniform same-class sample of its anchor (not the anchor)."""
    n = len(anchors)
    coin = torch.rand(n, generator=generator).to(labels.device) < p_switch
    pick = torch.rand(n, generator=generator).to(labels.device)
    same = labels[anchors, None] == labels[None, :]                    # (n, B)
    same[torch.arange(n, device=labels.device), anchors] = False
    count = same.sum(1)
    rank = (pick * count).long().clamp_max((count - 1).clamp_min(0))  # which of the same-class samples
    choice = (same.cumsum(1) > rank[:, None]).int().argmax(1)
    return torch.where(coin & (count > 0), choice, negatives)
