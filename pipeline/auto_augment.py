"""TrivialAugment Wide (Müller & Hutter, 2021), as torchvision's ImageNet recipes use it.

Each train image gets one operation of 14, at one of 31 magnitudes, both drawn uniformly, with a
random sign for the signed ones. The draws are made here, from the loaders' per-batch generator
(seed, epoch, rank, step), not by DALI's random operators: so resuming repeats them, and the DALI
backends and `torch-uint8` apply the same operation at the same magnitude to the same crop. DALI
applies them with its own suite (`nvidia.dali.auto_aug`), `torch-uint8` with torchvision's kernels
(`apply_operation`, written here because torchvision's `TrivialAugmentWide` draws its own; its
magnitudes are DALI's, and its equalization follows DALI's formula). The `torch` backend uses
torchvision's `TrivialAugmentWide` as it is.

Both apply it to the resized crop (uint8, before the flip and the normalization); geometric
operations fill with gray (128) and interpolate bilinearly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

AUTO_AUGMENTS = ("none", "trivial_augment_wide")
# DALI's wide suite, in its order: an index drawn here names the same operation in both backends.
OPERATIONS = (
    "translate_x", "translate_y", "shear_x", "shear_y", "rotate", "brightness", "contrast", "color",
    "sharpness", "posterize", "solarize", "equalize", "auto_contrast", "identity",
)  # fmt: skip
MAGNITUDE_BINS = 31
FILL = 128
# (first, last) magnitude of each operation that has one: bin b is linspace(first, last, 31)[b].
MAGNITUDES = {
    "translate_x": (0.0, 32.0),  # pixels
    "translate_y": (0.0, 32.0),
    "shear_x": (0.0, 0.99),
    "shear_y": (0.0, 0.99),
    "rotate": (0.0, 135.0),  # degrees
    "brightness": (0.01, 0.99),  # enhance factor 1 +/- magnitude
    "contrast": (0.01, 0.99),
    "color": (0.01, 0.99),
    "sharpness": (0.01, 0.99),
    "posterize": (8.0, 2.0),  # bits kept
    "solarize": (256.0, 0.0),  # threshold: pixels at or above it are inverted
}
UNSIGNED = ("posterize", "solarize")


def draw_operations(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: operation index, magnitude bin and sign (1 = negated), int32 each."""
    operations = rng.integers(0, len(OPERATIONS), count, dtype=np.int32)
    bins = rng.integers(0, MAGNITUDE_BINS, count, dtype=np.int32)
    signs = rng.integers(0, 2, count, dtype=np.int32)
    return operations, bins, signs


def magnitude(name: str, magnitude_bin: int, negate: int) -> float:
    """The magnitude DALI's suite gives `name` at this bin and sign."""
    if name not in MAGNITUDES:
        return 0.0
    value = float(np.linspace(*MAGNITUDES[name], MAGNITUDE_BINS)[magnitude_bin])
    return -value if negate and name not in UNSIGNED else value


def apply_operation(image: torch.Tensor, operation: int, magnitude_bin: int, negate: int) -> torch.Tensor:
    """One TrivialAugment operation on a uint8 C x H x W image, with torchvision's kernels."""
    name = OPERATIONS[operation]
    m = magnitude(name, magnitude_bin, negate)
    warp = {"interpolation": InterpolationMode.BILINEAR, "fill": FILL}
    if name in ("translate_x", "translate_y"):
        shift = [m, 0.0] if name == "translate_x" else [0.0, m]
        return F.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], **warp)
    if name in ("shear_x", "shear_y"):
        # torchvision shears the other way round from DALI's matrix [[1, m], [0, 1]]: the angle is negated.
        angle = -math.degrees(math.atan(m))
        shear = [angle, 0.0] if name == "shear_x" else [0.0, angle]
        return F.affine(image, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear, center=[0, 0], **warp)
    if name == "rotate":
        return F.rotate(image, m, **warp)
    if name == "brightness":
        return F.adjust_brightness(image, 1.0 + m)
    if name == "contrast":
        return F.adjust_contrast(image, 1.0 + m)
    if name == "color":
        return F.adjust_saturation(image, 1.0 + m)
    if name == "sharpness":
        return F.adjust_sharpness(image, 1.0 + m)
    if name == "posterize":
        return F.posterize(image, int(round(m)))
    if name == "solarize":
        return F.solarize(image, m) if m <= 255 else image  # a threshold above 255 inverts nothing
    if name == "equalize":
        return equalize_like_dali(image)
    if name == "auto_contrast":
        return F.autocontrast(image)
    return image


def equalize_like_dali(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalization per channel with OpenCV's formula, which DALI's `equalize` follows.

    Written here because torchvision's `equalize` follows PIL's formula instead, which on some
    images differs by tens of grey levels on average (33 on one demo image); this one gives DALI's
    pixels exactly, so that torch-uint8's batches stay dali-cpu's.
    """
    out = torch.empty_like(image)
    for channel, values in enumerate(image):
        histogram = torch.bincount(values.flatten().long(), minlength=256)
        lowest_count = int(histogram[histogram > 0][0])  # pixels at the channel's lowest level
        if lowest_count == values.numel():  # one level only: left as it is
            out[channel] = values
            continue
        scale = 255.0 / (values.numel() - lowest_count)
        lookup = torch.round((histogram.cumsum(0) - lowest_count).double() * scale).clamp(0, 255).to(torch.uint8)
        out[channel] = lookup[values.long()]
    return out
