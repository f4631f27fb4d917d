"""TrivialAugment Wide, RandAugment (torchvision's and timm's) and AutoAugment's ImageNet policy, as
torchvision's and timm's ImageNet recipes use them.

TrivialAugment Wide (Müller & Hutter, 2021) and RandAugment (Cubuk et al., 2020) pick operations of
the same 14 for each train image. TrivialAugment: one operation, at one of 31 magnitude bins, both
drawn uniformly. RandAugment: `ops` operations in a row, each drawn uniformly (with replacement),
all at the fixed magnitude bin `magnitude` of 31. AutoAugment's ImageNet policy (Cubuk et al., 2019;
torchvision's `--auto-augment imagenet`, its MobileNetV3 and ViT-B/32 recipes): one of 25
sub-policies drawn uniformly, each two operations in a row at fixed bins of 10, each applied with its
own probability; the sub-policies, ranges and bins are torchvision's (its policy table is read from
`torchvision.transforms.AutoAugment`), not DALI's `get_image_net_policy`, which follows the paper's
TensorFlow code (11 bins, other operations), so that every backend trains on the same policy.
Signed operations get a random sign each time.

timm's RandAugment (`rand_augment_timm`: timm's `rand-m9-mstd0.5-inc1`, the "ResNet strikes back"
recipes' `rand-m6`/`rand-m7-mstd0.5-inc1`) differs from torchvision's: its 15 operations are the
"increasing" ones (posterize, solarize and the enhancements grow stronger with the magnitude) plus
invert and solarize-add, each of the `ops` is applied with probability 0.5, and each application
draws its magnitude from a normal distribution around `magnitude` (0-10) with `magnitude_std`,
clipped to 0-10 and kept here to steps of 0.1 (the suite's 101 bins: DALI computes each
operation's parameter for every bin while it builds the graph, which takes minutes at 1,001
bins). The operation parameters follow timm's formulas (`timm_parameter`; the tests check them
against timm's `LEVEL_TO_ARG`). Where it differs from timm: geometric operations interpolate
bilinearly and fill with gray 128 (timm's own default fill; its `create_transform` passes the mean
colour instead, and its training script picks bilinear or bicubic at random unless
`--train-interpolation` is given), and equalize follows OpenCV's formula, as for the other suites.

The draws are made here, from the loaders' per-batch generator (seed, epoch, rank, step), not by
DALI's random operators: so resuming repeats them, and the DALI backends and `torch-uint8` apply the
same operations at the same magnitudes to the same crop. DALI applies them with its own suites
(`nvidia.dali.auto_aug`), `torch-uint8` with torchvision's kernels (`AutoAugment.apply`, written here
because torchvision's `TrivialAugmentWide`, `RandAugment` and `AutoAugment` draw their own; its
magnitudes are DALI's, and its equalization follows DALI's formula). The `torch` backend uses
torchvision's transforms as they are (for TrivialAugment and RandAugment their magnitudes differ a
little: translations of 150/331 of the image instead of 100/224, solarize thresholds from 255
instead of 256; for AutoAugment they are the same), and for timm's RandAugment, which torchvision
lacks, torch-uint8's draws and operations on its PIL images (`pipeline.transforms.DrawnAugment`).

The DALI backends and `torch-uint8` apply them to the resized crop (uint8, before the flip and the
normalization); geometric operations fill with gray (128) and interpolate bilinearly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

AUTO_AUGMENTS = ("none", "trivial_augment_wide", "rand_augment", "auto_augment_imagenet", "rand_augment_timm")
# TrivialAugment's and RandAugment's operations, in the order of DALI's suites (the same for both):
# an index drawn here names the same operation in every backend.
OPERATIONS = (
    "translate_x", "translate_y", "shear_x", "shear_y", "rotate", "brightness", "contrast", "color",
    "sharpness", "posterize", "solarize", "equalize", "auto_contrast", "identity",
)  # fmt: skip
# AutoAugment's ImageNet policy's operations; not applying one is "identity".
POLICY_OPERATIONS = (
    "shear_x", "rotate", "color", "contrast", "sharpness", "posterize", "solarize", "equalize", "auto_contrast",
    "invert", "identity",
)  # fmt: skip
# timm's RandAugment's operations (`_RAND_INCREASING_TRANSFORMS`, in timm's order); an operation that
# is not applied (probability 0.5) is "identity".
TIMM_OPERATIONS = (
    "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color", "contrast",
    "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "identity",
)  # fmt: skip
TIMM_MAX_LEVEL = 10  # timm's magnitudes run from 0 to its _LEVEL_DENOM
TIMM_LEVEL_STEPS = 10  # a drawn magnitude is kept to 0.1: bin b is magnitude b / 10
TIMM_MAGNITUDE_BINS = TIMM_MAX_LEVEL * TIMM_LEVEL_STEPS + 1
TIMM_OPERATION_CHANCE = 0.5  # timm's default `p`
TIMM_TRANSLATE = 0.45  # of the image side at magnitude 10: timm's default translate_pct
ENHANCEMENTS = ("brightness", "contrast", "color", "sharpness")
MAGNITUDE_BINS = 31  # TrivialAugment's and RandAugment's
POLICY_MAGNITUDE_BINS = 10  # AutoAugment's
FILL = 128
# (first, last) magnitude of each operation that has one, per suite: bin b is linspace(first, last,
# bins)[b]. Translations are in pixels; RandAugment's scale with the image (`translate_range`).
MAGNITUDES = {
    "trivial_augment_wide": {
        "translate_x": (0.0, 32.0),
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
    },
    "rand_augment": {
        "shear_x": (0.0, 0.3),
        "shear_y": (0.0, 0.3),
        "rotate": (0.0, 30.0),
        "brightness": (0.0, 0.9),
        "contrast": (0.0, 0.9),
        "color": (0.0, 0.9),
        "sharpness": (0.0, 0.9),
        "posterize": (8.0, 4.0),
        "solarize": (256.0, 0.0),
    },
    # torchvision's (`AutoAugment._augmentation_space`); at 10 bins the rounded posterize bits are
    # its 8, 8, 7, 7, 6, 6, 5, 5, 4, 4.
    "auto_augment_imagenet": {
        "shear_x": (0.0, 0.3),
        "rotate": (0.0, 30.0),
        "color": (0.0, 0.9),
        "contrast": (0.0, 0.9),
        "sharpness": (0.0, 0.9),
        "posterize": (8.0, 4.0),
        "solarize": (255.0, 0.0),
    },
}
RAND_AUGMENT_TRANSLATE = 100 / 224  # of the image side at the last bin: DALI's default
UNSIGNED = ("posterize", "solarize", "solarize_add")


TORCHVISION_NAMES = {
    "ShearX": "shear_x", "Rotate": "rotate", "Color": "color", "Contrast": "contrast", "Sharpness": "sharpness",
    "Posterize": "posterize", "Solarize": "solarize", "Equalize": "equalize", "AutoContrast": "auto_contrast",
    "Invert": "invert",
}  # fmt: skip


@functools.cache
def imagenet_policy() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AutoAugment's ImageNet policy as torchvision defines it: per sub-policy (25) and step (2), the
    operation (index into POLICY_OPERATIONS), its probability and its magnitude bin (0 when it has
    none)."""
    policy = transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET).policies
    operations = [[POLICY_OPERATIONS.index(TORCHVISION_NAMES[name]) for name, _, _ in steps] for steps in policy]
    chances = [[chance for _, chance, _ in steps] for steps in policy]
    bins = [[magnitude_bin or 0 for _, _, magnitude_bin in steps] for steps in policy]
    return np.array(operations, np.int32), np.array(chances), np.array(bins, np.int32)


def timm_parameter(name: str, level: float, image_size: int) -> float:
    """The parameter timm's RandAugment gives operation `name` at magnitude `level` (0-10; negative
    for a negated signed operation), by timm's formulas: degrees, shear factor, pixels, enhancement
    offset from 1, bits kept, solarize threshold, solarize-add shift."""
    fraction = level / TIMM_MAX_LEVEL
    if name == "rotate":
        return fraction * 30.0
    if name in ("shear_x", "shear_y"):
        return fraction * 0.3
    if name in ("translate_x", "translate_y"):
        return fraction * TIMM_TRANSLATE * image_size
    if name in ENHANCEMENTS:
        return fraction * 0.9
    if name == "posterize":
        return 4 - int(fraction * 4)
    if name == "solarize":
        return 256 - min(256, int(fraction * 256))
    if name == "solarize_add":
        return min(128, int(fraction * 110))
    return 0.0


@dataclass(frozen=True)
class AutoAugment:
    """Which automatic augmentation the train images get: `name` of AUTO_AUGMENTS, and for
    RandAugment its number of operations per image and their magnitude (torchvision's: a bin of
    31; timm's: 0-10, drawn around it with `magnitude_std`)."""

    name: str = "none"
    ops: int = 2
    magnitude: int = 9
    magnitude_std: float = 0.5

    def check(self) -> None:
        if self.name not in AUTO_AUGMENTS:
            raise ValueError(f"data.auto_augment: {self.name!r} is not one of {list(AUTO_AUGMENTS)}")
        if self.ops < 1:
            raise ValueError(f"data.rand_augment_ops must be at least 1, got {self.ops}")
        if self.name == "rand_augment_timm":
            if not 0 <= self.magnitude <= TIMM_MAX_LEVEL:
                raise ValueError(
                    f"data.rand_augment_magnitude must be from 0 to {TIMM_MAX_LEVEL} for rand_augment_timm "
                    f"(timm's m), got {self.magnitude}"
                )
            if not 0 <= self.magnitude_std <= TIMM_MAX_LEVEL:
                raise ValueError(
                    f"data.rand_augment_magnitude_std must be from 0 to {TIMM_MAX_LEVEL}, got {self.magnitude_std}"
                )
        elif not 0 <= self.magnitude < MAGNITUDE_BINS:
            raise ValueError(
                f"data.rand_augment_magnitude must be a bin from 0 to {MAGNITUDE_BINS - 1}, got {self.magnitude}"
            )

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def operations(self) -> tuple[str, ...]:
        """The suite's operations: a drawn operation index is a position in this."""
        return {"auto_augment_imagenet": POLICY_OPERATIONS, "rand_augment_timm": TIMM_OPERATIONS}.get(
            self.name, OPERATIONS
        )

    @property
    def magnitude_bins(self) -> int:
        return {"auto_augment_imagenet": POLICY_MAGNITUDE_BINS, "rand_augment_timm": TIMM_MAGNITUDE_BINS}.get(
            self.name, MAGNITUDE_BINS
        )

    @property
    def operations_per_image(self) -> int:
        return {"rand_augment": self.ops, "rand_augment_timm": self.ops, "auto_augment_imagenet": 2}.get(self.name, 1)

    def translate_range(self, image_size: int) -> tuple[float, float]:
        """First and last translation in pixels, for images of `image_size`."""
        if self.name == "rand_augment":
            return 0.0, image_size * RAND_AUGMENT_TRANSLATE
        return MAGNITUDES[self.name]["translate_x"]

    def draw(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image and operation: operation index, magnitude bin and sign (1 = negated), int32
        arrays of count x operations_per_image."""
        shape = (count, self.operations_per_image)
        if self.name == "trivial_augment_wide":
            operations = rng.integers(0, len(OPERATIONS), count, dtype=np.int32)
            bins = rng.integers(0, MAGNITUDE_BINS, count, dtype=np.int32)
            signs = rng.integers(0, 2, count, dtype=np.int32)
            return operations.reshape(shape), bins.reshape(shape), signs.reshape(shape)
        if self.name == "auto_augment_imagenet":
            policy_operations, chances, policy_bins = imagenet_policy()
            chosen = rng.integers(0, len(policy_operations), count)
            applied = rng.uniform(size=shape) < chances[chosen]
            signs = rng.integers(0, 2, shape, dtype=np.int32)
            operations = np.where(applied, policy_operations[chosen], POLICY_OPERATIONS.index("identity"))
            return operations.astype(np.int32), np.where(applied, policy_bins[chosen], 0).astype(np.int32), signs
        if self.name == "rand_augment_timm":
            operations = rng.integers(0, len(TIMM_OPERATIONS) - 1, shape, dtype=np.int32)  # identity excluded
            applied = rng.uniform(size=shape) < TIMM_OPERATION_CHANCE
            levels = rng.normal(self.magnitude, self.magnitude_std, shape)  # exactly `magnitude` at deviation 0
            bins = np.rint(np.clip(levels, 0, TIMM_MAX_LEVEL) * TIMM_LEVEL_STEPS).astype(np.int32)
            signs = rng.integers(0, 2, shape, dtype=np.int32)
            operations = np.where(applied, operations, TIMM_OPERATIONS.index("identity")).astype(np.int32)
            return operations, np.where(applied, bins, 0).astype(np.int32), signs
        operations = rng.integers(0, len(OPERATIONS), shape, dtype=np.int32)
        signs = rng.integers(0, 2, shape, dtype=np.int32)
        return operations, np.full(shape, self.magnitude, np.int32), signs

    def magnitude_of(self, name: str, magnitude_bin: int, negate: int, image_size: int) -> float:
        """The magnitude DALI's suite gives operation `name` at this bin and sign."""
        if self.name == "rand_augment_timm":
            value = float(timm_parameter(name, magnitude_bin / TIMM_LEVEL_STEPS, image_size))
            return -value if negate and name not in UNSIGNED else value
        if name in ("translate_x", "translate_y"):
            first, last = self.translate_range(image_size)
        elif name in MAGNITUDES[self.name]:
            first, last = MAGNITUDES[self.name][name]
        else:
            return 0.0
        value = float(np.linspace(first, last, self.magnitude_bins)[magnitude_bin])
        return -value if negate and name not in UNSIGNED else value

    def apply(self, image: torch.Tensor, operations, bins, signs) -> torch.Tensor:
        """One image's drawn operations in order, on a uint8 C x H x W square image."""
        for operation, magnitude_bin, negate in zip(operations, bins, signs, strict=True):
            name = self.operations[int(operation)]
            image = apply_operation(
                image, name, self.magnitude_of(name, int(magnitude_bin), int(negate), image.shape[-1])
            )
        return image


NO_AUTO_AUGMENT = AutoAugment()


def apply_operation(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """Operation `name` at magnitude `m` on a uint8 C x H x W image, with torchvision's kernels."""
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
    if name == "solarize_add":  # timm's: pixels below 128 raised by m (at most 128, so no overflow)
        return torch.where(image < 128, image + int(m), image)
    if name == "equalize":
        return equalize_like_dali(image)
    if name == "auto_contrast":
        return F.autocontrast(image)
    if name == "invert":
        return F.invert(image)
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
