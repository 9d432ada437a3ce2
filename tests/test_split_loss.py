"""The loss split across ranks, in one process: the parts (each a share of the queries against the whole
batch) sum to the whole loss and their gradients to its gradient; which losses split. Across real
processes: tests/test_parallel.py (variants simix and whole_loss in tests/parallel_worker.py)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import LossConfig, TrainConfig
from pipeline.losses import NAMES, RecallAtK, RecallAtKSiMix, build_loss, set_step
from pipeline.losses.protocol import splits
from pipeline.train.two_pass import loss_and_grad, share_loss_and_grad

# Unequal classes, shuffled, one singleton (no positives): shares hold different numbers of queries.
LABELS = torch.tensor([3, 0, 1, 0, 2, 2, 1, 0, 0, 3, 4, 2, 1, 3, 0, 2, 5, 1])


def embeddings(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 12, generator=g, dtype=dtype)
    return F.normalize(centres[LABELS] + torch.randn(len(LABELS), 12, generator=g, dtype=dtype), dim=1)


def losses():
    simix_all = RecallAtKSiMix((1, 2, 4, 8), 0.05, seed=1)
    simix_two = RecallAtKSiMix((1, 2, 4, 8), 0.05, include_query_in_rank=True, per_class=2, seed=1)
    for loss_fn in (simix_all, simix_two):
        set_step(loss_fn, 3)
    return {"rsk": RecallAtK((1, 2, 4, 8, 64), 0.05), "rsk_query": RecallAtK((1, 2, 4), 0.02, include_query_in_rank=True),
            "simix": simix_all, "simix_per_class": simix_two}


@pytest.mark.parametrize("kernel", ["reference", "torch"])
@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("name", ["rsk", "rsk_query", "simix", "simix_per_class"])
def test_parts_sum_to_the_whole(name, parts, kernel):
    loss_fn = losses()[name]
    loss_fn.kernel = kernel
    whole_emb = embeddings().requires_grad_()
    whole = loss_fn(whole_emb, LABELS)
    whole.backward()
    split_emb = embeddings().requires_grad_()
    pieces = [loss_fn.partial(split_emb, LABELS, part, parts) for part in range(parts)]
    sum(pieces).backward()
    assert len({round(p.item(), 12) for p in pieces}) == parts, "the parts are not different shares"
    torch.testing.assert_close(sum(pieces), whole, rtol=1e-12, atol=0)
    assert whole_emb.grad.norm() > 1e-3
    torch.testing.assert_close(split_emb.grad, whole_emb.grad, rtol=1e-10, atol=1e-12)


def test_a_part_gives_gradient_to_rows_outside_its_share():
    """Each part's queries are compared with the whole batch: its gradient reaches every row (what the
    reduce-scatter sums), not only its own share."""
    e = embeddings().requires_grad_()
    RecallAtK((1, 2, 4), 0.05).partial(e, LABELS, 0, 2).backward()
    assert e.grad[9:].abs().sum(1).gt(0).all()


def test_float32_parts_within_float32_precision():
    loss_fn = losses()["simix"]
    whole = loss_fn(embeddings(dtype=torch.float32), LABELS)
    split = sum(loss_fn.partial(embeddings(dtype=torch.float32), LABELS, p, 2) for p in range(2))
    assert split.dtype == torch.float32
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)


def built(name: str, **train):
    labels = LABELS.unique().tolist()
    return build_loss(LossConfig(name=name), TrainConfig(**train), labels, dim=12, seed=0)


def test_which_losses_split():
    """RS@k and RS@k + SiMix split (train.split_loss, on by default); every other loss is computed
    whole on every rank (pipeline/train/two_pass.py says why for each)."""
    assert {n for n in NAMES if splits(built(n))} == {"rsk", "rsk_simix"}
    assert not splits(built("rsk", split_loss=False)) and not splits(built("rsk_simix", split_loss=False))


def test_one_process_share_is_the_whole_loss():
    e = embeddings(dtype=torch.float32)
    loss_fn = RecallAtK((1, 2, 4), 0.05)
    loss, grad = share_loss_and_grad(e, LABELS, loss_fn)
    ref_loss, ref_grad = loss_and_grad(e, LABELS, loss_fn)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
