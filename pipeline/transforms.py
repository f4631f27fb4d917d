"""The augmentation spec shared by every backend, and its torchvision form.

Train: random-resized-crop (area 8-100%, aspect 3/4-4/3) to `size`, horizontal flip, optionally
TrivialAugment Wide, RandAugment (torchvision's or timm's) or AutoAugment's ImageNet policy
(`pipeline/auto_augment.py`), normalize.
Val: resize the shorter side to size / crop_pct (256 for 224), center crop `size`, normalize.
Both resize with antialiasing, bilinearly or (`interpolation`) bicubically.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.auto_augment import FILL, NO_AUTO_AUGMENT, AutoAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the same on the 0-255 scale of uint8 pixels, for the loaders that normalize after the resize
PIXEL_MEAN = tuple(m * 255 for m in IMAGENET_MEAN)
PIXEL_STD = tuple(s * 255 for s in IMAGENET_STD)
DEFAULT_CROP_PCT = 0.875  # 224 / 256, the usual ImageNet eval crop
RRC_AREA = (0.08, 1.0)
RRC_ASPECT_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10  # random crops tried before the central fallback, as torchvision does
INTERPOLATIONS = ("bilinear", "bicubic")  # InterpolationMode's values
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def val_resize_size(crop_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Shorter-side length before the center crop (256 for 224 at 0.875)."""
    return int(round(crop_size / crop_pct))


def torchvision_train_transform(
    size: int, auto_augment: AutoAugment = NO_AUTO_AUGMENT, interpolation: str = "bilinear"
) -> transforms.Compose:
    """The train spec on PIL images; with an `auto_augment` torchvision's own TrivialAugmentWide,
    RandAugment or AutoAugment (ImageNet policy) after the flip, as torchvision's reference recipes
    place them (timm's RandAugment, which torchvision lacks: `DrawnAugment`)."""
    steps = [
        transforms.RandomResizedCrop(
            size, scale=RRC_AREA, ratio=RRC_ASPECT_RATIO, interpolation=InterpolationMode(interpolation), antialias=True
        ),
        transforms.RandomHorizontalFlip(),
    ]
    warp = {"interpolation": InterpolationMode.BILINEAR, "fill": [FILL] * 3}
    if auto_augment.name == "trivial_augment_wide":
        steps.append(transforms.TrivialAugmentWide(**warp))
    elif auto_augment.name == "rand_augment":
        steps.append(transforms.RandAugment(auto_augment.ops, auto_augment.magnitude, **warp))
    elif auto_augment.name == "auto_augment_imagenet":
        steps.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET, **warp))
    elif auto_augment.enabled:  # no torchvision transform: the operations torch-uint8 applies, on PIL images
        steps.append(DrawnAugment(auto_augment))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


class DrawnAugment:
    """An `AutoAugment` on PIL images: its own draws (`AutoAugment.draw`, from torch's generator, which
    the torch backend seeds per sample) and operations (`AutoAugment.apply`, torchvision's kernels), for the
    suites torchvision has no transform of (timm's RandAugment)."""

    def __init__(self, augment: AutoAugment):
        self.augment = augment

    def __call__(self, image: Image.Image) -> Image.Image:
        rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, ())))
        operations, bins, signs = self.augment.draw(1, rng)
        pixels = self.augment.apply(F.pil_to_tensor(image), operations[0], bins[0], signs[0])
        return F.to_pil_image(pixels)


def random_resized_crops(
    heights: np.ndarray, widths: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Crop windows of torchvision's RandomResizedCrop for a batch: (x, y) anchors and (w, h) sizes.

    The same algorithm as `transforms.RandomResizedCrop.get_params` (area and log-aspect drawn up to
    RRC_ATTEMPTS times, the first window that fits is kept, else a central crop at the nearest
    allowed aspect), vectorized over the batch and drawn from `rng`, so the crops of a batch are a
    function of the generator's seed alone, whatever pipeline decodes them.
    """
    heights, widths = heights.astype(np.float64), widths.astype(np.float64)
    count = len(heights)
    area = (heights * widths)[:, None] * rng.uniform(*RRC_AREA, size=(count, RRC_ATTEMPTS))
    log_low, log_high = math.log(RRC_ASPECT_RATIO[0]), math.log(RRC_ASPECT_RATIO[1])
    aspect = np.exp(rng.uniform(log_low, log_high, size=(count, RRC_ATTEMPTS)))
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    found = fits[np.arange(count), first]
    crop_w, crop_h = w[np.arange(count), first], h[np.arange(count), first]
    position = rng.uniform(size=(count, 2))
    x = np.floor(position[:, 0] * (widths - crop_w + 1))
    y = np.floor(position[:, 1] * (heights - crop_h + 1))
    # Central fallback: the whole image, trimmed to the nearest allowed aspect ratio.
    image_aspect = widths / heights
    fallback_w = np.where(image_aspect > RRC_ASPECT_RATIO[1], np.round(heights * RRC_ASPECT_RATIO[1]), widths)
    fallback_h = np.where(image_aspect < RRC_ASPECT_RATIO[0], np.round(widths / RRC_ASPECT_RATIO[0]), heights)
    crop_w, crop_h = np.where(found, crop_w, fallback_w), np.where(found, crop_h, fallback_h)
    x = np.where(found, x, (widths - fallback_w) // 2)
    y = np.where(found, y, (heights - fallback_h) // 2)
    return np.stack([x, y], axis=1).astype(np.float32), np.stack([crop_w, crop_h], axis=1).astype(np.float32)


def torchvision_val_transform(
    size: int, crop_pct: float = DEFAULT_CROP_PCT, interpolation: str = "bilinear"
) -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(
                val_resize_size(size, crop_pct), interpolation=InterpolationMode(interpolation), antialias=True
            ),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def to_training_layout(images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """NCHW float batch -> `device`, `dtype`, channels_last memory format."""
    images = images.to(device, non_blocking=True)
    return images.to(dtype=dtype, memory_format=torch.channels_last)
