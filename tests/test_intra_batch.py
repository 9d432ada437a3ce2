"""Intra-batch message passing: shapes, that attention really mixes the batch, gradients."""
import torch
import torch.nn.functional as F

from pipeline.losses.intra_batch import IntraBatchLoss

LABELS = torch.tensor([3, 3, 5, 5, 7, 7, 9, 9])


def test_shapes_and_batch_mixing():
    loss_fn = IntraBatchLoss(dim=16, classes=[3, 5, 7, 9], layers=2, heads=4)
    emb = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    out = loss_fn.refine(emb)
    assert out.shape == (8, 16)
    # Message passing: a node's output depends on the other nodes of the batch.
    changed = emb.clone()
    changed[5] = -changed[5]
    assert not torch.allclose(loss_fn.refine(changed)[0], out[0])
    # Without the others (a batch of one) it differs too.
    assert not torch.allclose(loss_fn.refine(emb[:1])[0], out[0])


def test_gradients_reach_embeddings_and_every_parameter():
    loss_fn = IntraBatchLoss(dim=16, classes=[3, 5, 7, 9], layers=1, heads=2)
    emb = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=1).requires_grad_()
    loss = loss_fn(emb, LABELS)
    loss.backward()
    assert torch.isfinite(loss) and emb.grad.norm() > 0
    for name, p in loss_fn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Label-smoothed cross entropy on both heads, computed independently.
    y = torch.searchsorted(torch.tensor([3, 5, 7, 9]), LABELS)
    logits = [F.normalize(x, dim=1) @ F.normalize(c.weight, dim=1).T / 0.05
              for x, c in ((emb, loss_fn.backbone_classifier), (loss_fn.refine(emb), loss_fn.mpn_classifier))]
    smooth = lambda z: -(0.9 * F.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1) + 0.1 * F.log_softmax(z, 1).mean(1)).mean()
    torch.testing.assert_close(loss, smooth(logits[0]) + smooth(logits[1]))
