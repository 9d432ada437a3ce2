"""RS@k's smooth ranks as Triton kernels: the GPU kernel (same contract as rsk_fused.smooth_ranks).

    rank[r, j] = 1 + sum_{z != cols[r, j], z != self[r]} sigmoid((sim[r, z] - sim[r, cols[r, j]]) / tau)

Forward: one program per (query row, positive slot) walks the row in blocks of columns and keeps two
running sums in registers, sum_z sigmoid(u) (the rank) and sum_z sigmoid'(u) (the diagonal term of
the backward), so no (pairs x B) block ever reaches global memory. Backward: one program per (row,
block of columns) loops over the row's positives and writes sum_j g_rj sigmoid'(u_rjz) / tau, the
gradient of the row; the diagonal term -g_rj * sum_z sigmoid'(u) / tau, saved by the forward, is
added with one scatter. The excluded columns (z = p, and z = self unless the query counts) are
masked inside the kernels.

Its correctness is tested on the CPU with Triton's interpreter (TRITON_INTERPRET=1, read when the
kernels are defined, so set it before this module is first imported): tests/test_rsk_kernels.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.errors import UserError


def usable(device: torch.device) -> bool:
    """A CUDA device, or any device under the interpreter (the CPU tests)."""
    return device.type == "cuda" or bool(triton.knobs.runtime.interpret)


@triton.jit
def _ranks_kernel(sim_ptr, cols_ptr, self_ptr, rank_ptr, dsum_ptr, n_cols, n_slots, stride, inv_tau,
                  EXCLUDE_SELF: tl.constexpr, BLOCK: tl.constexpr):
    pair = tl.program_id(0)                      # row * n_slots + slot
    row = pair // n_slots
    p = tl.load(cols_ptr + pair)
    me = tl.load(self_ptr + row)
    row_ptr = sim_ptr + row.to(tl.int64) * stride
    base = tl.load(row_ptr + p) * inv_tau
    total = tl.zeros([BLOCK], dtype=tl.float32)
    slope = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        z = start + tl.arange(0, BLOCK)
        keep = (z < n_cols) & (z != p)
        if EXCLUDE_SELF:
            keep = keep & (z != me)
        s = tl.load(row_ptr + z, mask=z < n_cols, other=0.0)
        sig = tl.sigmoid(s * inv_tau - base)
        sig = tl.where(keep, sig, 0.0)
        total += sig
        slope += sig * (1.0 - sig)
    tl.store(rank_ptr + pair, 1.0 + tl.sum(total, axis=0))
    tl.store(dsum_ptr + pair, tl.sum(slope, axis=0))


@triton.jit
def _row_grad_kernel(sim_ptr, cols_ptr, self_ptr, g_ptr, grad_ptr, n_cols, n_slots, stride, grad_stride, inv_tau,
                     EXCLUDE_SELF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = z < n_cols
    row_ptr = sim_ptr + row.to(tl.int64) * stride
    s = tl.load(row_ptr + z, mask=inside, other=0.0) * inv_tau
    me = tl.load(self_ptr + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in range(0, n_slots):
        p = tl.load(cols_ptr + row * n_slots + slot)
        g = tl.load(g_ptr + row * n_slots + slot)
        sig = tl.sigmoid(s - tl.load(row_ptr + p) * inv_tau)
        keep = z != p
        if EXCLUDE_SELF:
            keep = keep & (z != me)
        acc += tl.where(keep, g * sig * (1.0 - sig), 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * grad_stride + z, acc * inv_tau, mask=inside)


def _block(n_cols: int) -> int:
    return min(1024, triton.next_power_of_2(max(n_cols, 16)))


class TritonSmoothRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sim: torch.Tensor, cols: torch.Tensor, self_col: torch.Tensor | None, tau: float) -> torch.Tensor:
        # fp32 whatever the input: with tau ~0.01, bf16 similarities and sums would be too coarse.
        ctx.dtype = sim.dtype
        sim, cols = sim.float().contiguous(), cols.contiguous()
        rows, n_slots = cols.shape
        exclude = self_col is not None
        me = (self_col if exclude else cols[:, 0]).contiguous()  # read only when excluding
        rank, dsum = sim.new_empty(rows, n_slots), sim.new_empty(rows, n_slots)
        if rank.numel():
            _ranks_kernel[(rows * n_slots,)](sim, cols, me, rank, dsum, sim.shape[1], n_slots, sim.stride(0),
                                             1.0 / tau, EXCLUDE_SELF=exclude, BLOCK=_block(sim.shape[1]))
        ctx.save_for_backward(sim, cols, me, dsum)
        ctx.inv_tau, ctx.exclude = 1.0 / tau, exclude
        return rank

    @staticmethod
    def backward(ctx, grad_rank: torch.Tensor):
        sim, cols, me, dsum = ctx.saved_tensors
        g = grad_rank.contiguous()
        rows, n_slots = cols.shape
        grad = torch.empty_like(sim)
        block = _block(sim.shape[1])
        if g.numel():
            _row_grad_kernel[(rows, triton.cdiv(sim.shape[1], block))](
                sim, cols, me, g, grad, sim.shape[1], n_slots, sim.stride(0), grad.stride(0), ctx.inv_tau,
                EXCLUDE_SELF=ctx.exclude, BLOCK=block)
        else:
            grad.zero_()
        grad.scatter_add_(1, cols, -(g * dsum) * ctx.inv_tau)  # d rank / d s_rp
        return grad.to(ctx.dtype), None, None, None


def smooth_ranks(sim: torch.Tensor, cols: torch.Tensor, self_col: torch.Tensor | None, tau: float) -> torch.Tensor:
    if not usable(sim.device):
        raise UserError("train.rsk_kernel=triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU tests); "
                        "use train.rsk_kernel=auto")
    return TritonSmoothRanks.apply(sim, cols, self_col, tau)
