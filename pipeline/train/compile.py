"""train.compile=true: torch.compile of each transformer block, in place, as torchtitan compiles per
block (one small graph compiled once and reused by every block of the same shape, instead of one
graph of the whole encoder).

`nn.Module.compile()` keeps the module and its parameters' names (no `_orig_mod.` in checkpoints),
so checkpoints, exports and the optimizer's groups are those of the eager model. Random ops inside
the compiled blocks (drop-path, dropout, LoRA dropout) draw from torch's own generator
(`fallback_random`): the two-pass step seeds it per chunk, so pass 2 replays pass 1's masks and the
step equals the eager step to float rounding. Activation checkpointing recomputes a compiled block
under the RNG state torch.utils.checkpoint restores.

The first step pays the compilation (logged: the first forward without and with gradients). FSDP2 and
ZeRO-3 gather each block's weights in hooks around its forward, which an in-place compiled block would
trace; that path is untested here, so train.compile is refused at load under them (pipeline/config/schema.py:
the backends that gather weights, pipeline/config/backends.py); none, ddp, zero1 and zero2 compile.
peft's LoRA adapter of nn.MultiheadAttention (open_clip's own towers) swaps the attention's weights
inside its forward, which inductor cannot compile (`set_` on a graph input): refused when the model
is built, before any step.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.parallel.engine import transformer_blocks

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, enabled: bool) -> None:
    """Compile each of the model's repeated blocks in place (train.compile); nothing when not enabled."""
    if not enabled:
        return
    import torch._inductor.config as inductor

    inductor.fallback_random = True  # eager's generator: the two-pass step's seeded chunks replay exactly
    blocks = transformer_blocks(model)
    refuse_adapted_multihead_attention(blocks)
    for block in blocks:
        block.compile()
    CompileTimer(model).attach()
    log.info("train.compile: %d blocks compiled with torch.compile (inductor); the first step compiles them",
             len(blocks))


def refuse_adapted_multihead_attention(blocks: list[nn.Module]) -> None:
    from peft.tuners.lora.layer import MultiheadAttention as AdaptedMultiheadAttention

    if any(isinstance(m, AdaptedMultiheadAttention) for block in blocks for m in block.modules()):
        raise UserError("train.compile=true cannot compile peft's LoRA adapter of nn.MultiheadAttention (open_clip's "
                        "own towers: it swaps the attention's weights inside its forward); adapt the MLP only "
                        "(model.lora.targets=[c_fc,c_proj]) or set train.compile=false")


class CompileTimer:
    """Logs how long the model's first forward without gradients and its first with them took: the
    blocks compile there (a hook on the whole model, which is not compiled, times it from outside)."""

    def __init__(self, model: nn.Module):
        self.model, self.seen, self.start = model, set(), 0.0

    def attach(self) -> None:
        self.handles = [self.model.register_forward_pre_hook(self.before), self.model.register_forward_hook(self.after)]

    def before(self, module, args) -> None:
        self.start = time.perf_counter()

    def after(self, module, args, output) -> None:
        grad = torch.is_grad_enabled()
        if grad not in self.seen:
            self.seen.add(grad)
            log.info("train.compile: the first forward %s gradients took %.1f s (compiling the blocks)",
                     "with" if grad else "without", time.perf_counter() - self.start)
        if len(self.seen) == 2:
            for handle in self.handles:
                handle.remove()
