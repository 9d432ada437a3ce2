"""`loss=<name>` -> the loss module the two-pass step calls as loss(embeddings, labels)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipeline.config import LossConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.losses.baselines import CLASS_LOSSES, DISTANCE_LOSSES, TUPLE_LOSSES, build_baseline
from pipeline.losses.intra_batch import IntraBatchLoss
from pipeline.losses.recall_at_k import RecallAtK
from pipeline.losses.simix import RecallAtKSiMix

NAMES = ("rsk", "rsk_simix", *TUPLE_LOSSES, *CLASS_LOSSES, "mpn")


def check_loss_config(cfg: LossConfig) -> None:
    """The loss settings a user can get wrong, each refused in one line."""
    if cfg.name not in NAMES:
        raise UserError(f"unknown loss.name={cfg.name}; available: {', '.join(NAMES)}")
    roth = ", ".join(DISTANCE_LOSSES)
    if cfg.miner not in ("default", "distance"):
        raise UserError(f"loss.miner={cfg.miner}: use default (the loss's own miner) or distance (Roth et al.'s)")
    if cfg.miner == "distance" and cfg.name not in DISTANCE_LOSSES:
        raise UserError(f"loss.miner=distance is for {roth}, not loss={cfg.name}")
    if not 0.0 <= cfg.p_switch <= 1.0:
        raise UserError(f"loss.p_switch={cfg.p_switch} must be a probability in [0, 1]")
    if cfg.p_switch and (cfg.name not in DISTANCE_LOSSES or cfg.miner != "distance"):
        raise UserError(f"loss.p_switch (Roth et al.'s rho rule) lives in his distance-weighted miner: use it with "
                        f"loss.miner=distance and one of {roth} (loss={cfg.name}, loss.miner={cfg.miner})")
    if cfg.distance_power not in (1, 2) or cfg.reduction not in ("pml", "mean"):
        raise UserError(f"loss.distance_power={cfg.distance_power}, loss.reduction={cfg.reduction}: "
                        "use 1 or 2, and pml or mean")
    if ((cfg.distance_power != 1 and cfg.name not in DISTANCE_LOSSES)
            or (cfg.reduction != "pml" and cfg.name not in (*DISTANCE_LOSSES, "multi_similarity"))):
        raise UserError(f"loss.distance_power and loss.reduction are for {roth} (reduction also multi_similarity), "
                        f"not loss={cfg.name}")
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        raise UserError(f"loss.weight_decay={cfg.weight_decay} must be >= 0 (or null: train.weight_decay)")
    if cfg.mpn_layers < 0 or cfg.mpn_heads < 1 or not 0.0 <= cfg.mpn_dropout < 1.0:
        raise UserError(f"loss.mpn_layers={cfg.mpn_layers}, loss.mpn_heads={cfg.mpn_heads}, "
                        f"loss.mpn_dropout={cfg.mpn_dropout}: need layers >= 0, heads >= 1, 0 <= dropout < 1")
    if cfg.simix_per_class < 0:
        raise UserError(f"loss.simix_per_class={cfg.simix_per_class}: use 0 (every pair) or a positive count")


def build_loss(cfg: LossConfig, train: TrainConfig, classes: Sequence[int], dim: int, seed: int) -> nn.Module:
    """classes: the training split's labels (proxy/classifier losses index them); dim: embedding size."""
    check_loss_config(cfg)
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
