"""Intra-batch message passing (Seidenschwarz, Elezi, Leal-Taixe, "Learning Intra-Batch Connections
for Deep Metric Learning", ICML 2021), trained end to end as a loss, as dvl-tum/intra_batch builds it.

The loss receives the embedding head's output before L2 normalisation (IBC's fc7; the finetune stage
asks the encoder for it: the loss is `TakesUnnormalized`, pipeline/losses/protocol.py):

- backbone classifier: Linear(D, C) with bias on the unnormalised features (net/resnet.py:198, 285);
- message passing on the batch as one fully connected graph with self-loops (net/graph_generator.py:
  thresh "no"), nodes = the L2-normalised features ('plain', net/resnet.py:290), first a Linear(D, D)
  (gnn_base.py:69, red 1), then `layers` post-norm layers (gnn_base.py:175-225): multi-head dot-product
  attention (net/attentions.py) whose softmax has an extra zero logit, so a node's weights sum to less
  than 1 (net/utils.py:170-176: the denominator adds exp(0 - max)), dropout on the weights (0.1,
  attentions.py:14,62), dropout, residual, LayerNorm, feed-forward 4x with ReLU and dropout, dropout,
  residual, LayerNorm; q, k, v and output projections Xavier-uniform with zero bias (attentions.py:73-84);
- MPN classifier on the last layer's output (or every layer's, concatenated: `concat`, IBC's `cat`
  on Cars), a BatchNorm1d neck with its shift frozen at 0 (gnn_base.py:80-85), then Linear without bias,
  N(0, 0.001) init (gnn_base.py:87-90, net/utils.py:162-167);
- both logits divided by the temperature (trainer.py:219, 234-236), label-smoothed cross entropy
  (utils/losses.py:84-104, epsilon 0.1), summed with weight 1 (trainer.py:220, 237).
  layers=0: the backbone's cross entropy alone (IBC on SOP: fns "lsce").

All of it lives in the loss, so it sees the whole global batch inside the two-pass step; at test
time only the backbone embeds (IBC's 'train' mode evaluation). Dropout draws from (seed, step).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses.baselines import ClassIndex
from pipeline.losses.protocol import TakesUnnormalized
from pipeline.losses.seeding import StepSeeded


class Attention(nn.Module):
    """IBC's MultiHeadDotProduct on a fully connected graph: node c attends to every node r, itself included."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        for linear in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d = x.shape
        q, k, v = (f(x).view(b, self.heads, d // self.heads).transpose(0, 1) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(1, 2) / math.sqrt(d // self.heads)           # (heads, target, source)
        sink = scores.new_zeros(*scores.shape[:2], 1)                          # the zero logit
        weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        return self.out((self.dropout(weights) @ v).transpose(0, 1).reshape(b, d))


class MessagePassing(nn.Module):
    """One layer: attention, dropout, residual, LayerNorm; feed-forward (4x), dropout, residual, LayerNorm."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention = Attention(dim, heads, dropout)
        self.feed_forward = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.attention(x)))
        return self.norm2(x + self.dropout2(self.feed_forward(x)))


class IntraBatchLoss(nn.Module, StepSeeded, TakesUnnormalized):
    """CE(backbone classifier) + CE(message-passing classifier), both label-smoothed, logits / temperature."""


    def __init__(self, dim: int, classes: Sequence[int], layers: int = 1, heads: int = 2, temperature: float = 0.2,
                 label_smoothing: float = 0.1, dropout: float = 0.1, concat: bool = False, seed: int = 0):
        super().__init__()
        self.index = ClassIndex(classes)
        n_classes = len(self.index.classes)
        self.temperature, self.label_smoothing, self.concat, self.seed = temperature, label_smoothing, concat, seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)   # the loss's initial weights depend on the seed only
            self.backbone_classifier = nn.Linear(dim, n_classes)
            self.layers = nn.ModuleList(MessagePassing(dim, heads, dropout) for _ in range(layers))
            if layers:
                self.reduce = nn.Linear(dim, dim)
                width = dim * layers if concat else dim
                self.neck = nn.BatchNorm1d(width)
                self.neck.bias.requires_grad_(False)
                self.mpn_classifier = nn.Linear(width, n_classes, bias=False)
                nn.init.normal_(self.mpn_classifier.weight, std=0.001)

    def refine(self, features: torch.Tensor) -> torch.Tensor:
        """The message-passing features of a batch of unnormalised features (before the neck)."""
        x = self.reduce(F.normalize(features, dim=-1))
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return torch.cat(outputs, 1) if self.concat else x

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = self.index(labels)
        with torch.autocast(embeddings.device.type, enabled=False), self.rng(embeddings.device):
            f = embeddings.float()
            logits = [self.backbone_classifier(f)]
            if len(self.layers):
                logits.append(self.mpn_classifier(self.neck(self.refine(f))))
            return sum(F.cross_entropy(z / self.temperature, y, label_smoothing=self.label_smoothing) for z in logits)
