"""Fewer transformer blocks, scaled exactly: a simulated step at two small depths, extrapolated to the
model's own depth.

A fake op costs the same whatever its size, so a simulated step costs about its number of ops, and
nearly all of them are in the blocks (40 in ViT-g/14). The blocks are identical, so every figure of a
step is an affine function of the depth n: parameters, gradients and optimizer state per block; the
activations kept per block (with checkpointing: each block's input); one block's gathered weights or
recomputation, the same at any depth; the FLOPs and bytes sent per block. Each phase's peak is the
same moment of the step at any depth (the last block's backward, say), so it is affine too: two
depths d1 < d2 pin the line, and figure(n) = figure(d1) + (figure(d2) - figure(d1)) * (n - d1) / (d2 - d1).
tests/test_plan.py checks that against a simulation at the full depth, field by field.

Below three blocks the peak is elsewhere (FSDP2: before the first reduce-scatter), so the smaller depth
is 3, plus model.trainable_blocks where some blocks are frozen (the frozen ones then grow in number, the
trainable ones stay); the larger 2 more.
"""
from __future__ import annotations

import dataclasses

import torch

from pipeline.config import Config
from pipeline.parallel.engine import transformer_blocks
from pipeline.models.encoders import build_encoder
from pipeline.plan.simulate import Measurement

PER_RUN = ("world_size", "chunk", "images", "global_batch")  # the same at every depth
NOT_SCALED = ("seconds",)                                   # summed: the cost of both runs


def full_depth(cfg: Config) -> int:
    """The encoder's number of transformer blocks (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = build_encoder(dataclasses.replace(cfg.model, pretrained=None), cfg.seed)
    return len(transformer_blocks(model))


def simulated_depths(cfg: Config, depth: int) -> tuple[int, int] | None:
    """The two depths to simulate, or None where they would not be fewer than the model's own."""
    low = 3 + max(cfg.model.trainable_blocks, 0)
    return (low, low + 2) if low + 2 < depth else None


def at_depth(cfg: Config, depth: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, depth=depth))


def _line(a, b, t: float):
    """a + (b - a) * t through numbers and (nested) dicts of them; a key missing on one side is 0 there."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = a or {}, b or {}
        return {k: _line(a.get(k, 0), b.get(k, 0), t) for k in {**a, **b}}
    value = a + (b - a) * t
    return round(value) if isinstance(a, int) and isinstance(b, int) else value  # bytes and counts stay whole


def extrapolate(a: Measurement, b: Measurement, depth_a: int, depth_b: int, depth: int) -> Measurement:
    """The Measurement at `depth`, on the line through a (at depth_a) and b (at depth_b); the overall peak
    is the largest phase peak on it."""
    for name in PER_RUN:
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"measurements differ in {name}: {getattr(a, name)} and {getattr(b, name)}")
    t = (depth - depth_a) / (depth_b - depth_a)
    fields = {f.name: _line(getattr(a, f.name), getattr(b, f.name), t) for f in dataclasses.fields(Measurement)
              if f.name not in PER_RUN + NOT_SCALED}
    top = max(fields["phase_peak"], key=fields["phase_peak"].get)
    fields.update(peak=fields["phase_peak"][top], at_peak=fields["phase_at_peak"][top])
    return Measurement(**{name: getattr(a, name) for name in PER_RUN}, **fields, seconds=a.seconds + b.seconds)
