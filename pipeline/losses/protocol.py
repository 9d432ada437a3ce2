"""What the two-pass step (pipeline/train/two_pass.py) may ask of a loss, written down.

Every loss is a callable `loss(embeddings, labels) -> scalar` over the gathered global batch,
computed in float32 whatever the forward's precision; it never knows about processes. Beyond that
call, a loss declares what more it offers by inheriting one of the classes below, and the step
asks only through `splits` and `wants_unnormalized`:

- `SplitsAcrossRanks`: the loss over the global batch is the sum over parts of
  `partial(embeddings, labels, part, parts)`, so under several processes each rank computes its own
  part (its query rows) and the gradients are reduce-scattered. Only without trainable parameters:
  their gradients would need summing across ranks too.
- `TakesUnnormalized`: the loss wants the head's output before L2 normalisation while training
  (the intra-batch network's classifier); the encoder is told so once, when training starts.
- `StepSeeded` (pipeline/losses/seeding.py): the loss draws random numbers as a function of
  (seed, step), told the step by `set_step` before each step, so every rank and both passes agree.
"""
from __future__ import annotations

from typing import Callable

import torch

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SplitsAcrossRanks:
    """A loss that can be computed in parts, one per rank; `split_across_ranks=False` turns it off."""

    split_across_ranks: bool = True

    def partial(self, embeddings: torch.Tensor, labels: torch.Tensor, part: int, parts: int) -> torch.Tensor:
        """This part's share of the loss over the whole batch (the shares sum to the loss)."""
        raise NotImplementedError


class TakesUnnormalized:
    """A loss that takes the embeddings before L2 normalisation while training."""


def splits(loss_fn: Loss) -> bool:
    """Whether each rank may compute only its part of the loss."""
    if not isinstance(loss_fn, SplitsAcrossRanks) or not loss_fn.split_across_ranks:
        return False
    return not any(p.requires_grad for p in loss_fn.parameters())


def wants_unnormalized(loss_fn: Loss) -> bool:
    return isinstance(loss_fn, TakesUnnormalized)
