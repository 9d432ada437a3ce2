"""Roth's multi-similarity reduction (recipe=roth loss=multi_similarity: loss.reduction=mean): the
loss equals his criterion (criteria/multisimilarity.py), written out here as he wrote it."""
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig, load_config
from pipeline.losses.baselines import build_baseline


def roth_ms(batch, labels, pos_weight=2.0, neg_weight=40.0, margin=0.1, thresh=0.5):
    similarity = batch.mm(batch.T)
    loss = []
    for i in range(len(batch)):
        pos = labels == labels[i]
        pos[i] = False
        anchor_pos, anchor_neg = similarity[i][pos], similarity[i][labels != labels[i]]
        neg_keep = (anchor_neg + margin) > torch.min(anchor_pos)
        pos_keep = (anchor_pos - margin) < torch.max(anchor_neg)
        if not neg_keep.sum() or not pos_keep.sum():
            continue
        loss.append(1 / pos_weight * torch.log(1 + torch.exp(-pos_weight * (anchor_pos[pos_keep] - thresh)).sum())
                    + 1 / neg_weight * torch.log(1 + torch.exp(neg_weight * (anchor_neg[neg_keep] - thresh)).sum()))
    return torch.stack(loss).mean()


def test_recipe_roth_multi_similarity_is_his_criterion():
    cfg = load_config(["recipe=roth", "loss=multi_similarity", "data=cub"]).loss
    assert cfg.reduction == "mean"
    labels = torch.arange(8).repeat_interleave(2)
    torch.manual_seed(0)
    x = F.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
    loss = build_baseline(cfg, labels.tolist(), 8, 0).double()
    ours = loss(x, labels)
    assert torch.allclose(ours, roth_ms(x, labels), atol=1e-10)
    pml = build_baseline(LossConfig(name="multi_similarity", beta=40.0, margin=0.1), labels.tolist(), 8, 0).double()
    assert not torch.allclose(pml(x, labels), ours)  # pml's mean over every anchor differs
