"""The deep-metric-learning baselines of Roth et al.'s comparison, through pytorch-metric-learning.

Tuple losses (contrastive, triplet, margin, multi-similarity, lifted) take their usual pml miner,
or with loss.miner=distance (contrastive, triplet, margin) Roth et al.'s distance-weighted miner,
which with loss.p_switch > 0 is his rho-regularisation (pipeline/losses/rho.py). loss.distance_power=2
and loss.reduction=mean give Roth's triplet and contrastive criteria (criteria/triplet.py:25,32:
squared distances, mean over all triplets; criteria/contrastive.py:34-35: mean over all pairs).
Proxy and classifier losses (proxy-anchor, normalized softmax, ArcFace) and the margin loss's
per-class beta hold parameters indexed by class: labels are mapped to 0..C-1 over the training
classes, kept as a buffer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_metric_learning import distances, losses, miners, reducers
from torch import nn

from pipeline.config import LossConfig
from pipeline.config.schema import CLASS_LOSSES, DISTANCE_LOSSES, TUPLE_LOSSES
from pipeline.losses.rho import DistanceMiner
from pipeline.losses.seeding import StepSeeded


class ClassIndex(nn.Module):
    """Maps dataset labels to 0..C-1 over the training classes."""

    def __init__(self, classes: Sequence[int]):
        super().__init__()
        self.register_buffer("classes", torch.as_tensor(sorted(set(int(c) for c in classes)), dtype=torch.long),
                             persistent=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(self.classes, labels).clamp_max(len(self.classes) - 1)
        if not torch.equal(self.classes[index], labels):
            raise ValueError("a batch label is not among the training classes the loss was built for")
        return index


class MetricLoss(nn.Module, StepSeeded):
    """A pytorch-metric-learning loss (+ optional miner) called as loss(embeddings, labels)."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None, classes: Sequence[int], seed: int = 0):
        super().__init__()
        self.loss, self.miner, self.index, self.seed = loss, miner, ClassIndex(classes), seed

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = self.index(labels)
        with self.rng(embeddings.device, salt=1):  # a miner's draws (distance-weighted sampling, rho's switches)
            tuples = self.miner(embeddings, y) if self.miner is not None else None
        with self.rng(embeddings.device):
            return self.loss(embeddings, y, tuples)


class AnchorsWithPairs(nn.Module):
    """Roth's multi-similarity reduction (criteria/multisimilarity.py:43-53): the mean of the anchors'
    losses over the anchors with both a mined positive and a mined negative; pml's averages over all."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss  # with pml's DoNothingReducer: one loss per anchor

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, tuples) -> torch.Tensor:
        out = self.loss(embeddings, labels, tuples)["loss"]  # DoNothingReducer: the loss dict, one element per anchor
        n = len(embeddings)
        both = (torch.bincount(tuples[0], minlength=n) > 0) & (torch.bincount(tuples[2], minlength=n) > 0)
        kept = out["losses"][both[out["indices"]]]
        return kept.mean() if len(kept) else embeddings.sum() * 0.0  # Roth's would fail on none


def _tuple_loss(cfg: LossConfig, n_classes: int) -> tuple[nn.Module, nn.Module | None]:
    roth = cfg.miner == "distance"
    kwargs = {}
    if cfg.name in DISTANCE_LOSSES:
        kwargs["distance"] = distances.LpDistance(power=cfg.distance_power)
        if cfg.reduction == "mean":
            kwargs["reducer"] = reducers.MeanReducer()
    if cfg.name == "contrastive":
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=cfg.margin, **kwargs), None
    if cfg.name == "triplet":
        return (losses.TripletMarginLoss(margin=cfg.margin, **kwargs),
                None if roth else miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard"))
    if cfg.name == "margin":
        return (losses.MarginLoss(margin=cfg.margin, beta=cfg.beta, learn_beta=True, num_classes=n_classes, **kwargs),
                None if roth else miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4))
    if cfg.name == "multi_similarity":  # alpha 2, base 0.5; beta and the miner's epsilon from the config
        miner = miners.MultiSimilarityMiner(epsilon=cfg.margin)
        if cfg.reduction == "mean":
            return AnchorsWithPairs(losses.MultiSimilarityLoss(alpha=2, beta=cfg.beta, base=0.5,
                                                               reducer=reducers.DoNothingReducer())), miner
        return losses.MultiSimilarityLoss(alpha=2, beta=cfg.beta, base=0.5), miner
    return losses.LiftedStructureLoss(neg_margin=cfg.margin, pos_margin=0.0), None


def _class_loss(cfg: LossConfig, n_classes: int, dim: int) -> nn.Module:
    if cfg.name == "proxy_anchor":
        return losses.ProxyAnchorLoss(n_classes, dim, margin=cfg.margin, alpha=cfg.scale)
    if cfg.name == "normalized_softmax":
        return losses.NormalizedSoftmaxLoss(n_classes, dim, temperature=cfg.temperature)
    return losses.ArcFaceLoss(n_classes, dim, margin=cfg.margin, scale=cfg.scale)


def build_baseline(cfg: LossConfig, classes: Sequence[int], dim: int, seed: int) -> MetricLoss:
    n_classes = len(set(classes))
    if cfg.name in TUPLE_LOSSES:
        loss, miner = _tuple_loss(cfg, n_classes)
        if cfg.miner == "distance":
            miner = DistanceMiner(cfg.p_switch)
        return MetricLoss(loss, miner, classes, seed)
    if cfg.name in CLASS_LOSSES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the proxies' / class weights' initialisation depends on the seed only
            return MetricLoss(_class_loss(cfg, n_classes, dim), None, classes, seed)
    raise ValueError(cfg.name)
