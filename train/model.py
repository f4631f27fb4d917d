"""Models by name from torchvision, laid out for fast training."""

from __future__ import annotations

import torch
from torchvision import models

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_model(name: str, num_classes: int, zero_init_residual: bool = False) -> torch.nn.Module:
    """A randomly initialised torchvision classifier in channels_last memory format.

    `zero_init_residual` zeroes the last BatchNorm of each residual block, so every block starts
    as the identity (Goyal et al., 2017).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: {name!r} is not one of {list(MODEL_NAMES)}")
    model = getattr(models, name)(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    return model.to(memory_format=torch.channels_last)
