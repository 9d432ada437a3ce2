"""The memory-efficient training step: one optimizer step on a batch far larger than fits.

1. Pass 1, no gradients: embed the batch chunk by chunk.
2. The loss over the whole batch's embeddings, and its gradient with respect to them.
3. Pass 2: embed each chunk again with gradients and back-propagate `(embedding * grad).sum()`.

Each chunk runs under its own RNG seed, a function of (seed, step, chunk start), so drop-path and
dropout draw the same masks in both passes (and on any number of processes), and the step equals
one step over the whole batch at once. Memory is one chunk's activations plus B x D embeddings.

Under several processes each rank holds a contiguous share of the global batch: pass 1 embeds the
share, the embeddings and labels are gathered, the loss over the global batch gives the gradient of
this rank's rows (`share_loss_and_grad`), and pass 2 back-propagates it; the engine sums the ranks'
contributions when it synchronises the gradients (once per step).

The loss itself is split across the ranks where that is exact (`splits`): RS@k and RS@k + SiMix are
sums over queries divided by the number of queries of the whole batch, known to every rank, so each
rank computes the terms of its own share of the queries against the whole gathered batch
(`loss_fn.partial`), a reduce-scatter sums the (B x D) embedding gradients of all ranks and leaves
each rank its own rows, and an all-reduce sums the loss (per rank, 0.52 of one process's cost on 2:
BENCHMARKS.md). Every
other loss is computed whole on every rank, as before, because its terms are not a sum with a
denominator known before the others are computed, or it has parameters:
  - pytorch-metric-learning's tuple losses: contrastive and triplet average over the non-zero terms
    (AvgNonZeroReducer), margin over the active pairs (DivisorReducer), denominators known only once
    every rank's terms are; multi-similarity and lifted are means over anchors, but their miners
    (and rho's switches) draw tuples from the whole batch: a split would run them per share;
  - proxy and classifier losses (proxy_anchor, normalized_softmax, arcface) and margin's beta:
    parameters shared by all anchors (proxy-anchor is a mean over proxies, not anchors);
  - mpn: message passing attends over the whole batch, so every term depends on every embedding.
"""
from __future__ import annotations

import torch

from pipeline.parallel import distributed
from pipeline.parallel.engine import Engine
from pipeline.losses.protocol import Loss, splits
from pipeline.rng import derive_seed, seeded_rng
from pipeline.train.timing import NO_TIMER


def chunk_seed(seed: int, step: int, start: int) -> int:
    """The RNG seed of the chunk that begins at `start` in the global batch of `step`."""
    return derive_seed(seed, step, start, 2)


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def embed_without_grad(engine: Engine, images: torch.Tensor, chunk_size: int, seeds: list[int]) -> torch.Tensor:
    """Pass 1."""
    outputs = []
    with torch.no_grad(), engine.autocast():
        for part, seed in zip(chunks(len(images), chunk_size), seeds):
            with seeded_rng(seed, engine.device):
                outputs.append(engine.model(images[part]).float())
    return torch.cat(outputs)


def loss_and_grad(embeddings: torch.Tensor, labels: torch.Tensor, loss_fn: Loss) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss over the whole batch and d(loss)/d(embeddings); the encoder is not in this graph."""
    embeddings = embeddings.detach().requires_grad_(True)
    loss = loss_fn(embeddings, labels)
    # The loss's own parameters (proxies, MPN layers) accumulate into .grad, as backward() would.
    params = [p for p in loss_fn.parameters() if p.requires_grad] if isinstance(loss_fn, torch.nn.Module) else []
    grad, *param_grads = torch.autograd.grad(loss, [embeddings, *params], allow_unused=True)
    for p, g in zip(params, param_grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return loss.detach(), grad


def share_loss_and_grad(embeddings: torch.Tensor, labels: torch.Tensor,
                        loss_fn: Loss) -> tuple[torch.Tensor, torch.Tensor]:
    """The global loss (the same on every rank) and its gradient with respect to this rank's rows,
    from this rank's embeddings and labels (shares of equal size)."""
    rank, world = distributed.rank(), distributed.world_size()
    all_embeddings, all_labels = distributed.gather_rows(embeddings), distributed.gather_rows(labels)
    if world > 1 and splits(loss_fn):
        part, grad = loss_and_grad(all_embeddings, all_labels, lambda e, y: loss_fn.partial(e, y, rank, world))
        return distributed.sum_over_ranks(part), distributed.reduce_scatter_rows(grad)
    loss, grad = loss_and_grad(all_embeddings, all_labels, loss_fn)
    return loss, grad[rank * len(embeddings):(rank + 1) * len(embeddings)]


def backward_in_chunks(engine: Engine, images: torch.Tensor, grad: torch.Tensor, chunk_size: int,
                       seeds: list[int]) -> None:
    """Pass 2: re-embed each chunk with gradients; the chain rule through the cached embedding gradient."""
    parts = chunks(len(images), chunk_size)
    for i, (part, seed) in enumerate(zip(parts, seeds)):
        with engine.gradient_sync(enabled=i == len(parts) - 1), seeded_rng(seed, engine.device):
            with engine.autocast():
                embeddings = engine.model(images[part]).float()
            engine.backward((embeddings * grad[part]).sum())


def two_pass_step(engine: Engine, images: torch.Tensor, labels: torch.Tensor, loss_fn: Loss,
                  chunk_size: int, seed: int, step: int, timer=NO_TIMER) -> torch.Tensor:
    """One optimizer step on the global batch, of which (images, labels) is this rank's share (all
    shares equal). Returns the global loss (the same on every rank). `timer` (pipeline.train.timing)
    times the four phases: pass1, loss (with the gathers), pass2, optimizer."""
    offset = distributed.rank() * len(images)  # the share's start in the global batch
    seeds = [chunk_seed(seed, step, offset + p.start) for p in chunks(len(images), chunk_size)]
    with timer.phase("pass1"):
        embeddings = embed_without_grad(engine, images, chunk_size, seeds)
    with timer.phase("loss"):
        loss, grad = share_loss_and_grad(embeddings, labels, loss_fn)
    with timer.phase("pass2"):
        backward_in_chunks(engine, images, grad, chunk_size, seeds)
    with timer.phase("optimizer"):
        engine.step()
    return loss


def one_pass_step(engine: Engine, images: torch.Tensor, labels: torch.Tensor, loss_fn: Loss,
                  chunk_size: int, seed: int, step: int) -> torch.Tensor:
    """The naive step, for comparison: every chunk's activations kept for one backward."""
    parts = chunks(len(images), chunk_size)
    outputs = []
    with engine.autocast():
        for part in parts:
            with seeded_rng(chunk_seed(seed, step, part.start), engine.device):
                outputs.append(engine.model(images[part]).float())
    loss = loss_fn(torch.cat(outputs), labels)
    engine.backward(loss)
    engine.step()
    return loss.detach()
