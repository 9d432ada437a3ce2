"""RS@k's smooth ranks with torch ops on cache-sized blocks: the CPU kernel (and the fallback on any device).

For query rows r of a similarity matrix (R, C), the columns of their positives cols (R, n) and the
column of each query itself, self (R,):

    rank[r, j] = 1 + sum_{z != cols[r, j], z != self[r]} sigmoid((sim[r, z] - sim[r, cols[r, j]]) / tau)

(with self=None the query's own column counts too: include_query_in_rank). Padded slots of cols are
computed like the others; the caller gives them a zero gradient.

The (R x n x C) block is never held whole. Forward builds it one slab of rows at a time in one
preallocated buffer sized to stay in cache (u = s_rz / tau - s_rp / tau, sigmoid in place, summed
over z) and keeps nothing of it. Backward rebuilds each slab in the same buffer and turns it, in
place, into g * sigmoid'(u): its sum over the positives is the gradient of the row (d rank / d s_rz),
its sum over z the diagonal term (d rank / d s_rp = -sum_z sigmoid'(u)). So forward is one sigmoid
pass and backward one sigmoid plus one multiply pass, against the reference's masked, checkpointed
block (pipeline/losses/recall_at_k.py: `_pair_ranks`), which autograd builds, scatters, gathers and
rebuilds. The terms z = p (sigmoid(0) = 1/2 exactly, constant) and z = self are subtracted after the
sums instead of masked inside the slab.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

# Elements of one slab: 4 MiB of float32, within L2 + L3 (measured on the build machine, 1 thread,
# B = 4,000 and SiMix at 10,000 rows: 2^20 the fastest of 2^16, 2^18, 2^20, 2^22; --block in the bench).
CPU_BLOCK = 1 << 20
# On a GPU the torch path is a fallback (the Triton kernel is the fast one): big slabs, few launches.
GPU_BLOCK = 1 << 24


def default_block(device: torch.device) -> int:
    return CPU_BLOCK if device.type == "cpu" else GPU_BLOCK


class SmoothRanks(torch.autograd.Function):
    """rank (R, n) from sim (R, C) float32; gradient with respect to sim only."""

    @staticmethod
    def forward(ctx, sim: torch.Tensor, cols: torch.Tensor, self_col: torch.Tensor | None, tau: float,
                block: int) -> torch.Tensor:
        inv_tau = 1.0 / tau
        rows, n = cols.shape
        slab = max(1, block // max(1, n * sim.shape[1]))
        total = sim.new_empty(rows, n)

        def ranks(start, stop, scaled, slab_buf):
            u = _slab(sim, cols, start, stop, inv_tau, scaled, slab_buf)
            torch.sigmoid(u, out=u)
            torch.sum(u, -1, out=total[start:stop])

        _for_each_slab(sim, n, slab, ranks)
        rank = total.add_(0.5)  # 1 + sum - sigmoid(0), the term z = p
        if self_col is not None:
            rank -= torch.sigmoid(_self_u(sim, cols, self_col, inv_tau))
        ctx.save_for_backward(sim, cols, self_col)
        ctx.inv_tau, ctx.slab = inv_tau, slab
        return rank

    @staticmethod
    def backward(ctx, grad_rank: torch.Tensor):
        sim, cols, self_col = ctx.saved_tensors
        inv_tau, slab = ctx.inv_tau, ctx.slab
        rows, n = cols.shape
        g = grad_rank.contiguous()
        grad = sim.new_empty(sim.shape)
        diagonal = sim.new_empty(rows, n)

        def row_grads(start, stop, scaled, slab_buf):
            u = _slab(sim, cols, start, stop, inv_tau, scaled, slab_buf)
            torch.sigmoid(u, out=u)
            # g * sigmoid * (1 - sigmoid), in place, in one pass
            torch.ops.aten.sigmoid_backward.grad_input(g[start:stop, :, None], u, grad_input=u)
            torch.sum(u, -1, out=diagonal[start:stop])
            torch.sum(u, 1, out=grad[start:stop])

        _for_each_slab(sim, n, slab, row_grads)
        grad.scatter_add_(1, cols, diagonal.neg_())
        if self_col is not None:  # take the z = self terms back out of both sums
            sig = torch.sigmoid(_self_u(sim, cols, self_col, inv_tau))
            term = g * sig * (1 - sig)
            grad.scatter_add_(1, self_col[:, None], -term.sum(1, keepdim=True))
            grad.scatter_add_(1, cols, term)
        return grad.mul_(inv_tau), None, None, None, None


def _for_each_slab(sim: torch.Tensor, n: int, slab: int, work: Callable[..., None]) -> None:
    """work(start, stop, scaled, slab_buf) for every slab of rows, each thread with its own buffers.

    On the CPU the slabs are shared out to torch.get_num_threads() Python threads, each running torch
    single-threaded: torch's own threading opens one OpenMP parallel region per op, whose barrier
    waits for the slowest thread, and on a machine whose cores are shared with other jobs that was
    measured several times slower than one thread (BENCHMARKS.md); whole slabs per thread need no
    barrier. Each slab's result is the same whichever thread computes it."""
    starts = range(0, sim.shape[0], slab)
    threads = min(torch.get_num_threads(), len(starts)) if sim.device.type == "cpu" else 1

    def worker(k: int) -> None:
        scaled, slab_buf = sim.new_empty(slab, sim.shape[1]), sim.new_empty(slab, n, sim.shape[1])
        with torch.no_grad():  # grad mode is per thread: a new one records by default
            for start in starts[k::threads]:
                work(start, min(start + slab, sim.shape[0]), scaled, slab_buf)

    if threads <= 1:
        return worker(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # read by each new thread's first parallel op
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
    finally:
        torch.set_num_threads(before)


def _slab(sim, cols, start, stop, inv_tau, scaled, slab_buf) -> torch.Tensor:
    """u[r, j, z] = s_rz / tau - s_rp / tau for rows start:stop, in the preallocated buffer. The scaled
    row is computed once per row (not per pair), and base is read from it, so u is exactly 0 at z = p."""
    rows = scaled[:stop - start]
    torch.mul(sim[start:stop], inv_tau, out=rows)
    base = rows.gather(1, cols[start:stop])
    u = slab_buf[:stop - start]
    torch.sub(rows[:, None, :], base[:, :, None], out=u)
    return u


def _self_u(sim, cols, self_col, inv_tau) -> torch.Tensor:
    """u at z = self for every pair, bit for bit as in the slabs (the same products, the same difference)."""
    return sim.gather(1, self_col[:, None]) * inv_tau - sim.gather(1, cols) * inv_tau


def smooth_ranks(sim: torch.Tensor, cols: torch.Tensor, self_col: torch.Tensor | None, tau: float,
                 block: int | None = None) -> torch.Tensor:
    return SmoothRanks.apply(sim, cols, self_col, tau, block or default_block(sim.device))
