"""Models by name from torchvision, laid out for fast training."""

from __future__ import annotations

import torch
from torchvision import models

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_model(
    name: str, num_classes: int, zero_init_residual: bool = False, blurpool: bool = False
) -> torch.nn.Module:
    """A randomly initialised torchvision classifier in channels_last memory format.

    `zero_init_residual` zeroes the last BatchNorm of each residual block, so every block starts
    as the identity (Goyal et al., 2017). `blurpool` blurs the input of each strided convolution
    (`add_blurpool`).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model.name: {name!r} is not one of {list(MODEL_NAMES)}")
    model = getattr(models, name)(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if blurpool:
        add_blurpool(model)
    return model.to(memory_format=torch.channels_last)


class BlurPoolConv2d(torch.nn.Module):
    """A convolution whose input first goes through a fixed 3x3 binomial blur, channel by channel.

    Anti-aliasing before downsampling (Zhang, "Making convolutional networks shift-invariant again",
    2019), as FFCV's ResNet recipes use it. Written here because torchvision has no such layer and
    these few lines do not justify a dependency on timm.
    """

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        # Not persistent: a constant, so checkpoints hold only what training changes.
        self.register_buffer("blur_kernel", kernel.expand(conv.in_channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = torch.nn.functional.conv2d(x, self.blur_kernel, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def add_blurpool(module: torch.nn.Module) -> None:
    """Wrap every convolution with a stride above 1 and at least 16 input channels in a blur
    (FFCV's rule: the stem's 3-channel convolution is left as it is)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            add_blurpool(child)
