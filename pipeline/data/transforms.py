"""Image -> tensor: training augmentation and the deterministic eval view, with the model's normalisation."""
from __future__ import annotations

from torchvision.transforms import v2 as T
import torch

from pipeline.config import DataConfig, ModelConfig


def _to_tensor(model: ModelConfig) -> list:
    from pipeline.encoders import preprocessing  # the model's own mean and std unless the config sets them

    mean, std = preprocessing(model)
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]


def train_transform(data: DataConfig, model: ModelConfig) -> T.Compose:
    steps = [T.RandomResizedCrop(model.image_size, scale=tuple(data.crop_scale), antialias=True)]
    if data.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _to_tensor(model))


def eval_transform(model: ModelConfig) -> T.Compose:
    return T.Compose([T.Resize(model.image_size, antialias=True), T.CenterCrop(model.image_size)] + _to_tensor(model))
