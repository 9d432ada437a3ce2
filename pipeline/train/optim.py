"""The optimizer and the learning-rate schedule of the finetune stage.

    train.optimizer  adamw (decoupled decay) | adam (L2: the decay is added to the gradient, torch.optim.Adam's
                     weight_decay, as the RS@k and Roth et al. code with --opt adam) | sgd (momentum 0.9, Roth
                     et al. main.py:166) | radam (decoupled decay: IBC's RAdam.py:69-70 is torch's
                     RAdam(decoupled_weight_decay=True))
    train.schedule   cosine: linear warmup (train.warmup_steps, or train.warmup_fraction of max_steps), then cosine to 0 at max_steps | step: linear warmup, then the lr is
                     multiplied by train.gamma at each of train.milestones (epochs), as torch's MultiStepLR
                     stepped once per epoch (the papers' loops: RS@k main.py:313-314, Roth main.py:299-300)

Parameter groups: the embedding head at train.head_lr (None: train.lr, the papers' single group), the
backbone at train.lr times its layer's train.layer_decay multiplier (pipeline/train/layer_decay.py);
weight decay on weight matrices only, or on every parameter with train.decay_norms_biases (the papers).

An epoch is the training split's images // train.global_batch steps (at least 1), as Roth et al.'s
sampler (datasampler/class_random_sampler.py:29), or the epoch of the authors' sampler that
train.sampler names (pipeline/data/epoch_rules.py); train.epochs, when set, decides max_steps, and the
milestones fall on the first step of their epoch.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config, TrainConfig
from pipeline.data.epoch_rules import FixedEpochs, build_sampler
from pipeline.data.shards import ShardIndex
from pipeline.train.layer_decay import lr_scales


def steps_per_epoch(cfg: TrainConfig, train_images: int) -> int:
    return max(1, train_images // cfg.global_batch)


def resolve_epochs(cfg: TrainConfig, train_images: int, clock=None) -> tuple[TrainConfig, dict]:
    """(the config with max_steps decided by train.epochs where set, the epoch facts for the checkpoint's meta).
    clock: the sampler's epochs (pipeline.data.epoch_rules); None: images // global_batch steps each."""
    clock = clock or FixedEpochs(steps_per_epoch(cfg, train_images))
    if cfg.epochs is not None:
        cfg = dataclasses.replace(cfg, max_steps=clock.epoch_start(cfg.epochs))
    return cfg, {"sampler": cfg.sampler, "train_images": train_images, "steps_per_epoch": clock.describe(cfg.epochs),
                 "epochs": cfg.epochs, "max_steps": cfg.max_steps}


def sampler_of(cfg: Config, labels):
    """(the training sampler, its epochs) for the run's training labels."""
    t = cfg.train
    return build_sampler(t.sampler, labels, t.global_batch, t.samples_per_class, cfg.seed, t.small_classes, t.redraw_pk)


def with_steps(cfg: Config, shards: Path) -> Config:
    """The config with train.max_steps decided by train.epochs over the training shards (the runner's
    resolution, before any stage is fingerprinted); unchanged without epochs or before the shards exist."""
    if cfg.train.epochs is None or not (shards / "train" / "index.json").is_file():
        return cfg
    labels = ShardIndex.load(shards / "train").labels
    return dataclasses.replace(cfg, train=resolve_epochs(cfg.train, len(labels), sampler_of(cfg, labels)[1])[0])


def warmup_steps(cfg: TrainConfig) -> int:
    """train.warmup_steps, or train.warmup_fraction of max_steps where set (a share, whatever the batch)."""
    if cfg.warmup_fraction > 0:
        return max(1, round(cfg.warmup_fraction * cfg.max_steps))
    return cfg.warmup_steps


def lr_factor(cfg: TrainConfig, per_epoch=1):
    """step -> multiplier of the base learning rates (torch LambdaLR). per_epoch: steps per epoch, or the
    sampler's epochs (epoch_rules: an epoch's length may vary)."""
    clock = FixedEpochs(per_epoch) if isinstance(per_epoch, int) else per_epoch
    milestones = [clock.step_of(m) for m in cfg.milestones]
    cfg = dataclasses.replace(cfg, warmup_steps=warmup_steps(cfg))

    def factor(step: int) -> float:
        warm = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
        if cfg.schedule == "step":
            return warm * cfg.gamma ** bisect.bisect_right(milestones, step)
        if step < cfg.warmup_steps:
            return warm
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    if kind == "radam":
        return torch.optim.RAdam(groups, decoupled_weight_decay=True)
    return torch.optim.AdamW(groups)


def build_optimizer(model: nn.Module, cfg: TrainConfig, per_epoch=1
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """per_epoch: optimizer steps per epoch (steps_per_epoch) or the sampler's epochs, for the milestones."""
    head_lr = cfg.lr if cfg.head_lr is None else cfg.head_lr
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    scales = lr_scales(model, cfg.layer_decay)  # train.layer_decay: {} when off
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = head_lr if name.startswith("head.") else cfg.lr * scales.get(name, 1.0)
        decay = cfg.weight_decay if param.ndim > 1 or cfg.decay_norms_biases else 0.0
        groups.setdefault((lr, decay), []).append(param)
    optimizer = _optimizer(cfg.optimizer, [{"params": p, "lr": lr, "weight_decay": wd}
                                           for (lr, wd), p in groups.items()])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, per_epoch))
