"""`loss=<name>` -> the loss module the two-pass step calls as loss(embeddings, labels)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.config import LossConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.losses.baselines import build_baseline
from pipeline.losses.intra_batch import IntraBatchLoss
from pipeline.losses.recall_at_k import RecallAtK
from pipeline.losses.simix import RecallAtKSiMix


def build_loss(cfg: LossConfig, train: TrainConfig, classes: Sequence[int], dim: int, seed: int) -> nn.Module:
    """classes: the training split's labels (proxy/classifier losses index them); dim: embedding size."""
    cfg.check()  # for callers that built the config by hand
    if cfg.name == "rsk":
        return RecallAtK(train.ks, train.tau_rank, train.tau_count, train.include_query_in_rank,
                         kernel=train.rsk_kernel, split_across_ranks=train.split_loss)
    if cfg.name == "rsk_simix":
        return RecallAtKSiMix(train.ks, train.tau_rank, train.tau_count, train.include_query_in_rank,
                              cfg.simix_per_class, seed, kernel=train.rsk_kernel, split_across_ranks=train.split_loss)
    if cfg.name == "mpn":
        if dim % cfg.mpn_heads:
            raise UserError(f"loss.mpn_heads={cfg.mpn_heads} must divide the embedding size {dim}")
        return IntraBatchLoss(dim, classes, cfg.mpn_layers, cfg.mpn_heads, cfg.temperature, cfg.label_smoothing,
                              cfg.mpn_dropout, cfg.mpn_concat, seed)
    return build_baseline(cfg, classes, dim, seed)
