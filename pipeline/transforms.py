"""The augmentation spec shared by every backend, and its torchvision form.

Train: random-resized-crop (area 8-100%, aspect 3/4-4/3) to `size`, horizontal flip, normalize.
Val: resize the shorter side to size / crop_pct (256 for 224), center crop `size`, normalize.
"""

from __future__ import annotations

import torch
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875  # 224 / 256, the usual ImageNet eval crop
RRC_AREA = (0.08, 1.0)
RRC_ASPECT_RATIO = (3 / 4, 4 / 3)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def val_resize_size(crop_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter-side length before the center crop (256 for 224 at 0.875)."""
    return int(round(crop_size / crop_pct))


def torchvision_train_transform(size: int) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=RRC_AREA, ratio=RRC_ASPECT_RATIO, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def torchvision_val_transform(size: int, crop_pct: float = DEFAULT_CROP_PCT) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(val_resize_size(size, crop_pct), antialias=True),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def to_training_layout(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """NCHW float batch -> `device`, `dtype`, channels_last memory format."""
    images = images.to(device, non_blocking=True)
    return images.to(dtype=dtype, memory_format=torch.channels_last)
