"""RS@k loss against an independent, loop-by-loop float64 reference of the paper's formula, with the
reference kernel and the fused torch kernel (tests/test_rsk_kernels.py compares the kernels)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import RecallAtK, recall_at_k_loss


def dense_reference(emb, labels, ks, tau_rank, tau_count, include_query, queries=None):
    """Plain loops over q, p, z straight from the definition; ks must already be clipped."""
    sim = emb @ emb.T
    labels = labels.tolist()
    n = len(labels)
    per_query = []
    for q in range(n) if queries is None else queries:
        positives = [p for p in range(n) if p != q and labels[p] == labels[q]]
        if not positives:
            continue
        recalls = []
        for k in ks:
            count = 0.0
            for p in positives:
                rank = 1.0
                for z in range(n):
                    if z == p or (z == q and not include_query):
                        continue
                    rank = rank + torch.sigmoid((sim[q, z] - sim[q, p]) / tau_rank)
                count = count + torch.sigmoid((k - rank) / tau_count)
            recalls.append(torch.clamp(count, max=k) / min(k, len(positives)))
        per_query.append(1.0 - sum(recalls) / len(recalls))
    return sum(per_query) / len(per_query)


def embed(n, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


EQUAL = torch.arange(4).repeat_interleave(3)                         # 4 classes x 3, sorted
# Unequal sizes 5, 3, 2, 1 (the singleton query has no positives), shuffled order.
UNEQUAL = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
UNEQUAL = UNEQUAL[torch.randperm(11, generator=torch.Generator().manual_seed(1))]


KERNELS = ["reference", "torch"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("labels", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
@pytest.mark.parametrize("include_query", [False, True])
# tau_count = 4 flattens the count sigmoid so the count exceeds k and the min(k, .) clamp matters.
@pytest.mark.parametrize("tau_rank,tau_count", [(0.01, 1.0), (0.1, 4.0)])
def test_matches_dense_reference(labels, include_query, tau_rank, tau_count, kernel):
    n = len(labels)
    emb = embed(n, seed=n)
    # 16 and 64 both clip to n - 1 and must be counted once.
    loss_fn = RecallAtK((1, 2, 4, 16, 64), tau_rank, tau_count, include_query, kernel=kernel)
    ref = dense_reference(emb, labels, (1, 2, 4, n - 1), tau_rank, tau_count, include_query)
    torch.testing.assert_close(loss_fn(emb, labels), ref, rtol=1e-10, atol=0)
    # float32 input: computed in float32, still close to the float64 reference.
    out32 = loss_fn(emb.float(), labels)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("labels", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
@pytest.mark.parametrize("include_query", [False, True])
def test_gradient_matches_dense_reference(labels, include_query, kernel):
    n = len(labels)
    ks, tau_rank, tau_count = (1, 2, 4, 8), 0.1, 0.5
    emb = embed(n, seed=3 * n).requires_grad_()
    ref_emb = emb.detach().clone().requires_grad_()
    RecallAtK(ks, tau_rank, tau_count, include_query, kernel=kernel)(emb, labels).backward()
    dense_reference(ref_emb, labels, ks, tau_rank, tau_count, include_query).backward()
    assert ref_emb.grad.abs().max() > 1e-3  # the comparison is not vacuous
    torch.testing.assert_close(emb.grad, ref_emb.grad, rtol=1e-5, atol=1e-8)
    # float32 gradients agree too, at float32 precision.
    emb32 = emb.detach().float().requires_grad_()
    RecallAtK(ks, tau_rank, tau_count, include_query, kernel=kernel)(emb32, labels).backward()
    torch.testing.assert_close(emb32.grad.double(), ref_emb.grad, rtol=1e-4, atol=1e-5)


def test_small_pair_chunk_matches_one_chunk():
    labels = UNEQUAL
    grads, losses = [], []
    for chunk in (3, 10_000):
        emb = embed(len(labels), seed=5).requires_grad_()
        loss = RecallAtK(tau_rank=0.05, include_query_in_rank=True, pair_chunk=chunk, kernel="reference")(emb, labels)
        loss.backward()
        losses.append(loss)
        grads.append(emb.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_include_query_in_rank_changes_value():
    emb = embed(12, seed=7)
    a = RecallAtK(include_query_in_rank=False)(emb, EQUAL)
    b = RecallAtK(include_query_in_rank=True)(emb, EQUAL)
    # The query outranks (almost) every positive, so including it pushes ranks up by ~1.
    assert b - a > 0.05


@pytest.mark.parametrize("kernel", KERNELS)
def test_query_mask_and_no_positives(kernel):
    emb = embed(11, seed=2)
    sim = emb @ emb.T
    # Masking queries removes them from the mean only, not from the database.
    mask = torch.arange(11) < 6
    masked = recall_at_k_loss(sim, UNEQUAL, (1, 2, 4), 0.05, 1.0, False, query_mask=mask, kernel=kernel)
    ref = dense_reference(emb, UNEQUAL, (1, 2, 4), 0.05, 1.0, False, queries=range(6))
    torch.testing.assert_close(masked, ref, rtol=1e-10, atol=0)
    # No query has a positive: a zero that still backpropagates.
    e = emb.clone().requires_grad_()
    zero = RecallAtK(kernel=kernel)(e, torch.arange(11))
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))


def test_half_precision_input_computes_in_float32():
    emb = embed(12, seed=4)
    ref = RecallAtK()(emb.bfloat16().double(), EQUAL)
    out = RecallAtK()(emb.bfloat16(), EQUAL)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)


def test_tight_clusters_give_near_zero_loss():
    # 8 well separated classes of 4 (one-hot centres), tiny intra-class noise. ks >= 2x the
    # class size: at rank == k the count sigmoid is 0.5, so with small k (e.g. 1) even a perfect
    # embedding keeps a loss floor of order 0.1 at tau_count = 1.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(8).repeat_interleave(4)[torch.randperm(32, generator=g)]
    centres = torch.eye(16)[labels]
    tight = F.normalize(centres + 1e-3 * torch.randn(32, 16, generator=g), dim=1)
    loss_fn = RecallAtK(ks=(8, 16), tau_rank=0.01)
    tight_loss = loss_fn(tight, labels)
    random_loss = loss_fn(F.normalize(torch.randn(32, 16, generator=g), dim=1), labels)
    assert tight_loss < 0.05
    assert random_loss > 0.3 and random_loss > 10 * tight_loss
    assert math.isfinite(random_loss.item())
