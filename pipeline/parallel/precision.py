"""Numerical precision, decided in one place: the forward's autocast (train.precision) and the dtype in
which sharded backends hold, gather and communicate weights (parallel.param_dtype).

    train.precision      auto: bf16 on CUDA, fp32 on the CPU
                         bf16: torch.autocast(bfloat16) around every forward; weights, gradients and
                               optimizer state stay fp32 (the GPU behaviour, and runnable on the CPU)
                         fp32: no autocast (the papers' codes trained so)
    train.tf32           fp32 runs on CUDA: matmuls and convolutions in TF32 (tensor cores, 10-bit mantissa,
                         fp32 range and accumulation): true by default, as the papers' codes ran on Ampere
                         and later GPUs (torch 1.7-1.11 had TF32 on by default; RS@k's code pins torch 1.8.0);
                         false: IEEE fp32 on the CUDA cores, about 7x slower on an H100. No effect on bf16 runs
                         or on the CPU.
    parallel.param_dtype auto: bf16 under fsdp2 and zero* when the forward is bf16 on CUDA, else fp32
                         bf16: fsdp2 gathers bf16 copies of the fp32 shards (MixedPrecisionPolicy),
                               zero* runs DeepSpeed's bf16 mode (fp32 master weights in the optimizer);
                               gradients are still reduced in fp32
                         fp32: weights gathered and held in fp32

The loss, the gathered embeddings and the metrics are fp32 whatever the precision: every forward's
output is cast with `.float()` before it leaves the autocast region, and the losses switch autocast
off inside. This module imports no backend (no DeepSpeed, no FSDP), so the engines and inference can both use
it; the config checks of both keys are in pipeline/config/schema.py.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline.config.backends import backend as described
from pipeline.config.schema import PRECISIONS
from pipeline.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MATMULS = ("bf16", "tf32", "fp32")  # what a run's matmuls compute in: the peak FLOP/s they are measured against


def resolve(precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32': what train.precision means on `device`."""
    if precision not in PRECISIONS:
        raise UserError(f"train.precision={precision} is unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The forward's precision: bf16 autocast, or nothing (fp32). CPU autocast supports bfloat16, so the
    GPU's dtype flow runs on the CPU too (slowly: auto stays fp32 there)."""
    if resolve(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_param_dtype(param_dtype: str, backend: str, precision: str, device: torch.device) -> str:
    """'bf16' or 'fp32': the dtype in which `backend` gathers and holds the weights for the forward."""
    if param_dtype == "auto":
        lowered = device.type == "cuda" and described(backend).holds_weights and resolve(precision, device) == "bf16"
        return "bf16" if lowered else "fp32"
    return param_dtype


def matmul_precision(precision: str, tf32: bool, device: torch.device) -> str:
    """'bf16', 'tf32' or 'fp32': what the forward's and backward's matmuls run in on `device` (the peak
    that the plan's step time and perf/mfu divide by)."""
    if resolve(precision, device) == "bf16":
        return "bf16"
    return "tf32" if tf32 and device.type == "cuda" else "fp32"


def set_tf32(precision: str, tf32: bool, device: torch.device) -> str:
    """Set torch's TF32 switches for this process as train.precision and train.tf32 say; returns
    matmul_precision. Only fp32 runs on CUDA change them (bf16 runs keep torch's defaults for their fp32
    parts, the loss among them). torch's older switches, not set_float32_matmul_precision: that one also
    lowers the CPU's oneDNN matmuls, and both readers of the flags (old and new API) accept these."""
    matmul = matmul_precision(precision, tf32, device)
    if device.type == "cuda" and matmul != "bf16":
        torch.backends.cuda.matmul.allow_tf32 = matmul == "tf32"
        torch.backends.cudnn.allow_tf32 = matmul == "tf32"
    return matmul
