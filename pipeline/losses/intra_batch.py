"""Intra-batch message passing (Seidenschwarz, Elezi, Leal-Taixe, "Learning Intra-Batch Connections
for Deep Metric Learning", ICML 2021), trained end to end as a loss.

The batch is a fully connected graph whose nodes are the backbone embeddings. Message-passing
layers refine each node with multi-head attention over all the others, then residual + LayerNorm +
feed-forward (residual + LayerNorm again). Two classifiers over the training classes, one on the
backbone embedding and one on the refined embedding, are trained with label-smoothed cross
entropy on cosine logits divided by a temperature. All of it lives in the loss, so it sees the
whole global batch inside the two-pass step's loss; at test time only the backbone embeds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.baselines import ClassIndex


class MessagePassing(nn.Module):
    """One layer: attention over the batch graph, residual + LayerNorm, feed-forward, residual + LayerNorm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        x = nodes[None]                                        # one graph: (1, B, dim)
        messages, _ = self.attention(x, x, x, need_weights=False)
        x = self.norm1(x + messages)
        return self.norm2(x + self.feed_forward(x))[0]


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


class IntraBatchLoss(nn.Module):
    """CE(backbone classifier) + CE(message-passing classifier), both label-smoothed."""

    def __init__(self, dim: int, classes: Sequence[int], layers: int = 2, heads: int = 4,
                 temperature: float = 0.05, label_smoothing: float = 0.1, seed: int = 0):
        super().__init__()
        self.index = ClassIndex(classes)
        n_classes = len(self.index.classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)   # the loss's initial weights depend on the seed only
            self.layers = nn.ModuleList(MessagePassing(dim, heads) for _ in range(layers))
            self.backbone_classifier = CosineClassifier(dim, n_classes)
            self.mpn_classifier = CosineClassifier(dim, n_classes)
        self.temperature, self.label_smoothing = temperature, label_smoothing

    def refine(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = self.index(labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            e = embeddings.float()
            ce = [F.cross_entropy(classifier(x) / self.temperature, y, label_smoothing=self.label_smoothing)
                  for classifier, x in ((self.backbone_classifier, e), (self.mpn_classifier, self.refine(e)))]
        return ce[0] + ce[1]
