"""Image -> tensor: training augmentation and the deterministic eval view, with the model's normalisation.

Training: RandomResizedCrop(model.image_size, scale=data.crop_scale), flips (data.hflip), then, with
probability data.random_erasing, one random rectangle erased to IBC's fill value (dataset/utils.py:84-85,
149-196: area 2-40% of the image, aspect ratio 0.3-3.3, fill (0.4914, 0.4822, 0.4465) after normalisation).
Eval: the shorter side resized to data.eval_resize (None: model.image_size), then a centre crop of
model.image_size (the papers: Resize(256) then CenterCrop(224), RS@k src/datasets.py:228-229).
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2 as T

from pipeline.config import DataConfig, ModelConfig

ERASE_FILL = [0.4914, 0.4822, 0.4465]  # IBC's RandomErasing mean, written into the normalised image


def _to_tensor(model: ModelConfig) -> list:
    from pipeline.models.encoders import (
        preprocessing,  # the model's own mean and std unless the config sets them
    )

    mean, std = preprocessing(model)
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]


def train_transform(data: DataConfig, model: ModelConfig) -> T.Compose:
    steps = [T.RandomResizedCrop(model.image_size, scale=tuple(data.crop_scale), antialias=True)]
    if data.hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += _to_tensor(model)
    if data.random_erasing:
        steps.append(T.RandomErasing(p=data.random_erasing, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3), value=ERASE_FILL))
    return T.Compose(steps)


def eval_transform(model: ModelConfig, resize: int | None = None) -> T.Compose:
    """resize: data.eval_resize, the shorter side before the centre crop (None: model.image_size)."""
    return T.Compose([T.Resize(resize or model.image_size, antialias=True), T.CenterCrop(model.image_size)]
                     + _to_tensor(model))
