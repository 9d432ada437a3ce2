"""Numerical precision, decided in one place: the forward's autocast (train.precision) and the dtype in
which sharded backends hold, gather and communicate weights (parallel.param_dtype).

    train.precision      auto: bf16 on CUDA, fp32 on the CPU
                         bf16: torch.autocast(bfloat16) around every forward; weights, gradients and
                               optimizer state stay fp32 (the GPU behaviour, and runnable on the CPU)
                         fp32: no autocast (the papers' codes trained so)
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
