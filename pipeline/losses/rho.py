"""Roth et al.'s distance-weighted triplet miner and its rho-regularisation ("Revisiting Training
Strategies and Generalization Performance in Deep Metric Learning", ICML 2020), as a
pytorch-metric-learning miner: the pml losses (contrastive, triplet, margin) compute the loss on its
triplets. Follows Confusezius/Revisiting_Deep_Metric_Learning_PyTorch, batchminer/rho_distance.py.

One triplet per anchor a that has another sample of its class in the batch (rho_distance.py:22-39):

- with probability p_switch, Roth's rho rule: (a, a, n) with n drawn uniformly among a's own class,
  n != a. The positive term vanishes (d(a, a) = 0) and only the push on the same-class n acts,
  which keeps some intra-class spread, so the embedding space is less compressed (l.28-32);
- otherwise (a, p, n): p uniform among a's class, p != a (l.35-37), and n drawn from the other
  classes with probability proportional to the inverse density of distances between points uniform
  on the unit sphere in D dimensions, q(d)^-1 with log q(d) = (D - 2) log d + (D - 3)/2 log(1 - d^2/4)
  (l.50-66), distances clamped from below at the lower cutoff 0.5 (l.16; parameters.py:147) and no
  upper cutoff (Roth's is commented out, l.61-63).

p_switch = 0 is Roth's distance miner (batchminer/distance.py), except that an anchor alone in its
class is skipped (as in rho_distance.py:26) where distance.py gives it the triplet (a, a, n); with
the P x K sampler (K >= 2) no anchor is alone. Unlike pytorch-metric-learning's DistanceWeightedMiner
(one triplet per positive pair, upper cutoff 1.4), this draws one triplet per anchor.

Random draws use the global RNG: MetricLoss runs the miner under a seed of (seed, step).
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner

LOWER_CUTOFF = 0.5  # parameters.py:144 and :147 (miner_distance_lower_cutoff, miner_rho_distance_lower_cutoff)


def inverse_sphere_density(embeddings: torch.Tensor, labels: torch.Tensor,
                           lower_cutoff: float = LOWER_CUTOFF) -> torch.Tensor:
    """(B, B): row a holds the probabilities of drawing each sample as a's negative (0 on a's class;
    a row with no other class is all 0)."""
    e = embeddings.detach().double()
    dim = e.shape[1]
    gram = e @ e.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt().clamp_min(lower_cutoff)
    log_w = (2.0 - dim) * dist.log() - (dim - 3) / 2 * (1.0 - 0.25 * dist ** 2).clamp_min(1e-300).log()
    negative = labels[:, None] != labels[None, :]
    log_w = log_w.masked_fill(~negative, -torch.inf)
    top = log_w.max(1, keepdim=True).values.nan_to_num(neginf=0.0)  # for stability (rho_distance.py:58)
    w = (log_w - top).exp()
    return w / w.sum(1, keepdim=True).clamp_min(1e-300)


class DistanceMiner(BaseMiner):
    """Roth's distance-weighted miner; p_switch > 0 makes it his rho-regularised miner."""

    def __init__(self, p_switch: float = 0.0, lower_cutoff: float = LOWER_CUTOFF, **kwargs):
        super().__init__(**kwargs)
        self.p_switch, self.lower_cutoff = p_switch, lower_cutoff

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        same = labels[:, None] == labels[None, :]
        partners = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        weights = inverse_sphere_density(embeddings, labels, self.lower_cutoff)
        anchors = torch.nonzero(partners.any(1) & (~same).any(1)).squeeze(1)
        if len(anchors) == 0:
            return anchors, anchors, anchors
        positives = torch.multinomial(partners[anchors].float(), 1).squeeze(1)
        negatives = torch.multinomial(weights[anchors], 1).squeeze(1)
        pushed = torch.multinomial(partners[anchors].float(), 1).squeeze(1)   # the rho rule's same-class negative
        switch = torch.rand(len(anchors), device=anchors.device) < self.p_switch
        return anchors, torch.where(switch, anchors, positives), torch.where(switch, pushed, negatives)
