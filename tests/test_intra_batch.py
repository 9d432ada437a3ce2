"""Intra-batch message passing against a hand-written forward of dvl-tum/intra_batch (net/gnn_base.py,
net/attentions.py, net/utils.py, net/graph_generator.py, utils/losses.py, trainer.py), with the weights
copied from our module: the structure, the logits and the loss on a small batch."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LossConfig, ModelConfig, TrainConfig
from pipeline.losses import build_loss, set_step
from pipeline.losses.intra_batch import IntraBatchLoss
from pipeline.losses.protocol import wants_unnormalized
from pipeline.models.encoders import build_encoder

CLASSES = [3, 5, 7, 9]
LABELS = torch.tensor([3, 3, 5, 5, 7, 7, 9, 9])


def features(seed=0, dim=16):
    return 3 * torch.randn(8, dim, generator=torch.Generator().manual_seed(seed))  # unnormalised, like fc7


def ibc_softmax(src, index, dim_size):
    """net/utils.py:170-176 (scatter over the edges' target node), margin 0."""
    src_max = torch.zeros(src.shape[0], dim_size).scatter_reduce(1, index.expand_as(src), src, "amax",
                                                                 include_self=False).clamp(min=0.0)
    src = (src - src_max.index_select(1, index)).exp()
    denom = torch.zeros(src.shape[0], dim_size).index_add(1, index, src)
    return src / (denom + (0.0 - src_max).exp()).index_select(1, index)


def ibc_attention(att, feats, heads):
    """net/attentions.py:35-71 on the edge list of net/graph_generator.py (thresh 'no': every (r, c))."""
    bs, d = feats.shape
    hdim = d // heads
    edge_index = torch.nonzero(torch.ones(bs, bs))
    r, c = edge_index[:, 0], edge_index[:, 1]
    k = att.k(feats).view(bs, heads, hdim).transpose(0, 1)
    q = att.q(feats).view(bs, heads, hdim).transpose(0, 1)
    v = att.v(feats).view(bs, heads, hdim).transpose(0, 1)
    scores = torch.matmul(q.index_select(1, c).unsqueeze(-2), k.index_select(1, r).unsqueeze(-1))
    scores = ibc_softmax(scores.view(heads, len(r)) / math.sqrt(hdim), c, bs)       # dropout: eval (p = 0)
    out = scores.unsqueeze(-1) * v.index_select(1, r)
    out = torch.zeros(heads, bs, hdim).index_add(1, c, out)                       # aggr 'add'
    return att.out(out.transpose(0, 1).contiguous().view(bs, heads * hdim))


def ibc_layer_norm(x, norm):
    """net/utils.py:70-87."""
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(unbiased=False, dim=-1, keepdim=True) + 1e-5)
    return x * norm.weight + norm.bias


def ibc_label_smooth_ce(logits, targets, n_classes, epsilon=0.1):
    """utils/losses.py:92-104."""
    log_probs = torch.log_softmax(logits, 1)
    t = torch.zeros_like(log_probs).scatter_(1, targets[:, None], 1)
    t = (1 - epsilon) * t + epsilon / n_classes
    return (-t * log_probs).mean(0).sum()


def ibc_loss(ours: IntraBatchLoss, fc7, labels, heads, temperature, concat):
    """trainer.py:214-238: encoder logits (Linear with bias on fc7), the GNN on the normalised fc7
    ('plain'), cat or the last layer, BN neck, Linear without bias; both / temperature, label smoothing."""
    y = torch.searchsorted(torch.tensor(CLASSES), labels)
    probs = F.linear(fc7, ours.backbone_classifier.weight, ours.backbone_classifier.bias)
    loss = ibc_label_smooth_ce(probs / temperature, y, len(CLASSES))
    if not len(ours.layers):
        return loss, probs, None
    feats = ours.reduce(F.normalize(fc7, p=2, dim=1))
    outs = []
    for layer in ours.layers:                                                      # gnn_base.py:207-225
        feats = ibc_layer_norm(feats + ibc_attention(layer.attention, feats, heads), layer.norm1)
        lin1, lin2 = layer.feed_forward[0], layer.feed_forward[3]
        feats = ibc_layer_norm(feats + lin2(F.relu(lin1(feats))), layer.norm2)
        outs.append(feats)
    feats = torch.cat(outs, 1) if concat else outs[-1]
    neck = (feats - feats.mean(0)) / torch.sqrt(feats.var(0, unbiased=False) + 1e-5) * ours.neck.weight
    pred = F.linear(neck, ours.mpn_classifier.weight)
    return loss + ibc_label_smooth_ce(pred / temperature, y, len(CLASSES)), probs, pred


@pytest.mark.parametrize("layers, heads, concat", [(1, 2, False), (2, 8, True), (2, 4, False), (0, 8, False)])
def test_forward_equals_ibcs(layers, heads, concat):
    ours = IntraBatchLoss(16, CLASSES, layers=layers, heads=heads, temperature=0.2, dropout=0.0, concat=concat, seed=1)
    fc7 = features(seed=layers)
    expected, probs, pred = ibc_loss(ours, fc7, LABELS, heads, 0.2, concat)
    torch.testing.assert_close(ours(fc7, LABELS), expected, rtol=1e-5, atol=1e-6)
    if layers:
        torch.testing.assert_close(ours.mpn_classifier(ours.neck(ours.refine(fc7))), pred, rtol=1e-5, atol=1e-6)


def test_structure_is_ibcs():
    ours = IntraBatchLoss(16, CLASSES, layers=2, heads=8, concat=True, seed=0)
    assert isinstance(ours.reduce, nn.Linear) and ours.reduce.weight.shape == (16, 16)      # gnn_base.py:69
    assert ours.backbone_classifier.bias is not None and ours.backbone_classifier.weight.shape == (4, 16)
    assert ours.mpn_classifier.bias is None and ours.mpn_classifier.weight.shape == (4, 32)   # cat: 2 x 16
    assert isinstance(ours.neck, nn.BatchNorm1d) and not ours.neck.bias.requires_grad and (ours.neck.bias == 0).all()
    assert ours.mpn_classifier.weight.std() < 0.002                                         # N(0, 0.001)
    layer = ours.layers[0]
    assert layer.feed_forward[0].weight.shape == (64, 16) and layer.feed_forward[3].weight.shape == (16, 64)
    assert layer.attention.heads == 8 and all((lin.bias == 0).all() for lin in (layer.attention.q, layer.attention.out))
    dropouts = [m.p for m in ours.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.1] * 8                       # attention weights, feed-forward, dropout_1, dropout_2; x 2
    assert not hasattr(IntraBatchLoss(16, CLASSES, layers=0), "neck")     # SOP: the backbone's CE alone


def test_the_zero_logit_makes_attention_weights_sum_below_one():
    ours = IntraBatchLoss(16, CLASSES, layers=1, heads=2, dropout=0.0, seed=0)
    att = ours.layers[0].attention
    x = 0.1 * F.normalize(features(), dim=1)   # small scores: the zero logit weighs about 1 / (8 + 1)
    with torch.no_grad():   # with v = 1 and an identity output projection, the output is the weights' sum
        att.v.weight.zero_()
        att.v.bias.fill_(1.0)
        att.out.weight.copy_(torch.eye(16))
        att.out.bias.zero_()
        total = att(x)
    assert (total < 0.95).all() and (total > 0.8).all()
    torch.testing.assert_close(total, ibc_attention(att, x, 2))


def test_dropout_is_on_in_training_and_seeded_by_step():
    loss_fn = build_loss(LossConfig(name="mpn", mpn_layers=1, mpn_heads=2), TrainConfig(), CLASSES, 16, seed=0)
    fc7 = features()
    set_step(loss_fn, 2)
    a, b = loss_fn(fc7, LABELS), loss_fn(fc7, LABELS)
    set_step(loss_fn, 3)
    c = loss_fn(fc7, LABELS)
    assert a == b and a != c
    loss_fn.eval()
    no_dropout = IntraBatchLoss(16, CLASSES, layers=1, heads=2, temperature=0.05, dropout=0.0, seed=0)
    no_dropout.load_state_dict(loss_fn.state_dict())
    no_dropout.neck.eval()
    torch.testing.assert_close(loss_fn(fc7, LABELS), no_dropout(fc7, LABELS))


def test_gradients_reach_the_features_and_every_trainable_parameter():
    loss_fn = IntraBatchLoss(16, CLASSES, layers=2, heads=4, concat=True, seed=1)
    fc7 = features().requires_grad_()
    loss_fn(fc7, LABELS).backward()
    assert fc7.grad.norm() > 0
    for name, p in loss_fn.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.norm() > 0, name


def test_the_encoder_gives_the_mpn_unnormalised_features_in_training_only():
    model = build_encoder(ModelConfig(patch_size=8, depth=1, embed_dim=16, drop_path=0.0), seed=0)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.unnormalized_in_training = wants_unnormalized(IntraBatchLoss(16, CLASSES, layers=0))
    raw = model.train()(images)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(model.eval()(images), F.normalize(raw, dim=1))   # eval and export: normalised
