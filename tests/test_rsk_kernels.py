"""The fused RS@k kernels (torch slabs; Triton under its CPU interpreter) against the reference kernel,
the first vectorised implementation: loss and gradient within 1e-5 relative in float32, on random and
adversarial inputs. (tests/test_recall_at_k.py checks the kernels against independent dense loops.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.losses import RecallAtKSiMix, recall_at_k_loss, set_step, simix, simix_pairs
from pipeline.losses.recall_at_k import padded_positives, pick_kernel, rsk_rows

KS = (1, 2, 4, 8, 16, 64)  # 64 > B - 1 everywhere below: clipped to B - 1


def shuffled(sizes, seed):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def clustered(labels, dim=16, spread=1.0, seed=0):
    """Embeddings around one centre per class (similarities spread out, as after training)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(labels.max()) + 1, dim, generator=g)
    return F.normalize(centres[labels] + spread * torch.randn(len(labels), dim, generator=g), dim=1)


def case(name):
    """(similarities (B, B) float32, labels, query mask or None)."""
    if name == "random":             # 37 rows: no slab size below divides it; classes of 9..1, shuffled
        labels = shuffled([9, 7, 6, 5, 4, 3, 2, 1], 0)
        e = F.normalize(torch.randn(len(labels), 16, generator=torch.Generator().manual_seed(1)), dim=1)
        return e @ e.T, labels, None
    if name == "clustered":
        labels = shuffled([4] * 10, 2)
        e = clustered(labels, spread=0.8)
        return e @ e.T, labels, None
    if name == "ties":               # similarities on a coarse grid: many exact ties with the positives
        labels = shuffled([5, 5, 4, 4, 3], 3)
        e = clustered(labels, spread=1.5, seed=3)
        return torch.round(e @ e.T * 8) / 8, labels, None
    if name == "all_equal":          # every similarity the same: every u = 0
        labels = shuffled([4, 4, 3, 2], 4)
        return torch.full((len(labels), len(labels)), 0.3), labels, None
    if name == "singletons":         # mostly classes of one (no positives), a few pairs
        labels = shuffled([1] * 12 + [2, 2, 3], 5)
        e = clustered(labels, seed=5)
        return e @ e.T, labels, None
    if name == "one_class":          # every other sample is a positive
        labels = torch.zeros(13, dtype=torch.long)
        e = clustered(labels, seed=6)
        return e @ e.T, labels, None
    if name == "query_mask":         # rows 0..19 only are queries; all rows stay in the database
        labels = shuffled([6, 5, 5, 4, 3, 2], 7)
        e = clustered(labels, seed=7)
        return e @ e.T, labels, torch.arange(len(labels)) < 20
    if name == "simix":              # originals + every within-class virtual sample
        labels = shuffled([4, 4, 3, 3, 2, 1], 8)
        e = clustered(labels, seed=8)
        pairs = simix_pairs(labels)
        alphas = torch.rand(len(pairs), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        sim, all_labels = simix(e @ e.T, labels, pairs, alphas)
        return sim, all_labels, None
    raise ValueError(name)


CASES = ["random", "clustered", "ties", "all_equal", "singletons", "one_class", "query_mask", "simix"]


def loss_and_grad(sim, labels, mask, kernel, include_query, tau_rank, **kw):
    sim = sim.detach().float().requires_grad_()
    if kw:  # rsk_rows directly: a chosen slab size
        rows = torch.arange(len(sim)) if mask is None else mask.nonzero()[:, 0]
        loss = rsk_rows(sim[rows], labels, rows, KS, tau_rank, 1.0, include_query, kernel=kernel, **kw)
    else:
        loss = recall_at_k_loss(sim, labels, KS, tau_rank, 1.0, include_query, query_mask=mask, kernel=kernel)
    loss.backward()
    return loss.detach(), sim.grad


def assert_matches_reference(name, kernel, include_query, tau_rank, **kw):
    sim, labels, mask = case(name)
    ref_loss, ref_grad = loss_and_grad(sim, labels, mask, "reference", include_query, tau_rank)
    loss, grad = loss_and_grad(sim, labels, mask, kernel, include_query, tau_rank, **kw)
    assert loss.dtype == grad.dtype == torch.float32
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    assert ref_grad.norm() > 0, "vacuous: no gradient"
    err = (grad - ref_grad).norm() / ref_grad.norm()
    assert err <= 1e-5, f"relative gradient difference {err:.2e}"


@pytest.mark.parametrize("include_query", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_torch_kernel_matches_reference(name, include_query):
    assert_matches_reference(name, "torch", include_query, tau_rank=0.01)
    assert_matches_reference(name, "torch", include_query, tau_rank=0.2)


@pytest.mark.parametrize("slab_rows", [1, 3, 8])
def test_torch_kernel_slabs_not_dividing_the_rows(slab_rows):
    """37 rows in slabs of 1, 3, 8 rows (the last slab short)."""
    sim, labels, _ = case("random")
    n = int(padded_positives(labels, torch.arange(len(labels)))[1].sum(1).max())
    assert len(labels) % slab_rows or slab_rows == 1
    assert_matches_reference("random", "torch", False, 0.05, block=slab_rows * n * len(labels))


def test_padded_positives():
    labels = torch.tensor([2, 0, 2, 1, 2, 0, 3])
    rows = torch.tensor([0, 3, 4, 6])
    cols, filled = padded_positives(labels, rows)
    got = [sorted(c[f].tolist()) for c, f in zip(cols, filled)]
    assert got == [[2, 4], [], [0, 2], []]
    assert cols.shape == (4, 2) and torch.equal(cols[~filled], torch.tensor([3, 3, 6, 6]))  # padding: own column


def test_simix_module_matches_reference_kernel():
    labels = shuffled([4, 4, 4, 3, 2], 9)
    emb = clustered(labels, seed=9)
    grads, losses = [], []
    for kernel in ("reference", "torch"):
        e = emb.clone().requires_grad_()
        loss_fn = RecallAtKSiMix((1, 2, 4, 8), tau_rank=0.05, kernel=kernel, seed=2)
        set_step(loss_fn, 4)
        loss = loss_fn(e, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append(e.grad)
    assert abs(losses[1] - losses[0]) <= 1e-5 * losses[0]
    assert (grads[1] - grads[0]).norm() <= 1e-5 * grads[0].norm()


def test_unknown_kernel_refused_when_the_config_loads():
    from pipeline.config import load_config

    assert load_config(["train.rsk_kernel=reference"]).train.rsk_kernel == "reference"
    with pytest.raises(UserError, match="train.rsk_kernel=fused is unknown"):
        load_config(["train.rsk_kernel=fused"])


def test_auto_picks_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    from pipeline.losses import recall_at_k

    monkeypatch.setattr(recall_at_k, "_launches", {"cuda": True})  # as if the tiny launch had worked
    assert pick_kernel("auto", torch.device("cpu")) == "torch"
    assert pick_kernel("auto", torch.device("cuda")) == "triton"  # triton ships with CUDA builds of torch
    assert pick_kernel("reference", torch.device("cuda")) == "reference"
    with pytest.raises(UserError, match="train.rsk_kernel=fast is unknown; use one of auto, torch, triton"):
        pick_kernel("fast", torch.device("cpu"))


def triton_differences() -> dict:
    """Every case through the Triton kernel against the reference: (loss, gradient) relative differences."""
    from pipeline.losses import rsk_triton

    sim, labels, _ = case("clustered")
    cols, _ = padded_positives(labels, torch.arange(len(labels)))
    low = sim.bfloat16().requires_grad_(True)
    rank = rsk_triton.smooth_ranks(low, cols, None, 0.01)
    rank.sum().backward()
    exact = rsk_triton.smooth_ranks(low.detach().float(), cols, None, 0.01)
    out = {"bf16_input": [str(rank.dtype), str(low.grad.dtype), bool(torch.equal(rank, exact))]}
    for name in CASES:
        for include_query in (False, True):
            sim, labels, mask = case(name)
            ref_loss, ref_grad = loss_and_grad(sim, labels, mask, "reference", include_query, 0.01)
            loss, grad = loss_and_grad(sim, labels, mask, "triton", include_query, 0.01)
            out[f"{name}-{include_query}"] = (abs((loss - ref_loss) / ref_loss).item(),
                                              ((grad - ref_grad).norm() / ref_grad.norm()).item())
    return out


def test_triton_kernel_in_interpreter_matches_reference():
    """Triton's interpreter is chosen when the kernels are defined, and triton.language's own jit
    functions when triton is first imported: so a fresh process with TRITON_INTERPRET=1 from the start."""
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of torch)")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    differences = json.loads(proc.stdout.strip().splitlines()[-1])
    # bf16 similarities: computed in fp32 (the result equals the fp32 kernel's on the same values)
    assert differences.pop("bf16_input") == ["torch.float32", "torch.bfloat16", True]
    assert len(differences) == 2 * len(CASES)
    for key, (loss_err, grad_err) in differences.items():
        assert loss_err <= 1e-5 and grad_err <= 1e-5, (key, loss_err, grad_err)


def test_triton_refused_on_cpu_without_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="Triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sim, labels, _ = case("clustered")
    with pytest.raises(UserError, match="train.rsk_kernel=triton needs a CUDA device"):
        recall_at_k_loss(sim, labels, kernel="triton")


if __name__ == "__main__":  # run by test_triton_kernel_in_interpreter_matches_reference
    print(json.dumps(triton_differences()))
