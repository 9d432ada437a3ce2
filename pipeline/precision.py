"""Numeric precision in one place: the autocast that training and inference both enter.

Here rather than in the engines, so that embedding images does not import the training backends.
"""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on GPU; full fp32 on CPU, where bf16 is slow and inexact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
