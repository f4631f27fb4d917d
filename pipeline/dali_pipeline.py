"""The DALI graph: encoded images in, decoded, cropped/resized, flipped and normalized out.

One definition serves GPU decoding (`mixed`: nvJPEG and the hardware JPEG decoder) and CPU decoding
(no GPU at all), as in DALI's ResNet-50 example. The encoded images come from a Python source (a
`pipeline.batch_stream.BatchStream`) instead of a DALI reader: see that module for why. Images
stored as pixels (`tools.make_shards --train-raw-pixels`) skip the decoder: with a GPU they are
copied to it and cropped there, in batched operators only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations
from nvidia.dali.auto_aug.augmentations import sharpness_kernel
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.auto_aug.rand_augment import get_rand_augment_suite
from nvidia.dali.auto_aug.trivial_augment import get_trivial_augment_wide_suite

from pipeline.auto_augment import (
    FILL,
    MAGNITUDES,
    NO_AUTO_AUGMENT,
    TIMM_LEVEL_STEPS,
    TIMM_MAX_LEVEL,
    UNSIGNED,
    AutoAugment,
    timm_parameter,
)
from pipeline.transforms import PIXEL_MEAN, PIXEL_STD

# Antialiased, DALI's cubic filter follows PIL's bicubic about as closely as its linear filter follows
# PIL's bilinear: 20 sample photographs resized to 224 px differ from PIL's by 0.19 grey levels on
# average at most (linear: 0.18), 90 x 80 crops of them enlarged to 224 px by 0.31 (linear: 0.20).
RESIZE_FILTERS = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}


def torchvision_resize_size(images, shorter: int):
    """Output (height, width) of torchvision's Resize(shorter): the long side is floored, not rounded.

    DALI's own `resize_shorter` rounds the long side, which shifts the center crop by a pixel and
    makes the `torch` and DALI backends disagree on val images.
    """
    shape = images.shape(dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    # +1e-3 guards the floor against float32 error when the exact result is a whole number.
    return dmath.floor(height * shorter / short + 1e-3), dmath.floor(width * shorter / short + 1e-3)


def torchvision_center(length, crop: int):
    """Relative crop position that reproduces torchvision's CenterCrop anchor, round((length - crop) / 2).

    Python rounds halves to even (58.5 -> 58, 59.5 -> 60); DALI's crop_pos=0.5 rounds them up, a
    one-pixel shift on every image with an odd margin.
    """
    margin = length - crop
    half = margin / 2
    floor_half = dmath.floor(half)
    is_half = (half - floor_half) * 2  # 1.0 when the margin is odd
    floor_is_odd = floor_half - 2 * dmath.floor(floor_half / 2)
    anchor = floor_half + is_half * floor_is_odd
    return anchor / dmath.max(margin, 1.0)


@augmentation(param_device="auto")
def sharpness(data, kernel):
    """The suites' sharpness on `fn.filter` (their magnitudes are given in `dali_suite`): DALI's own
    still calls the deprecated alias `fn.experimental.filter`, which prints a DeprecationWarning at
    every pipeline build."""
    return fn.filter(data, kernel)


@augmentation
def equalize(data, _):
    """The suite's equalize on `fn.equalize`, for the same reason (`fn.experimental.equalize`)."""
    return fn.equalize(data)


def posterize_mask(bits: float) -> np.ndarray:
    """The AND mask that keeps `bits` high bits (0 keeps none: timm's strongest posterize is black,
    where DALI's own mask function keeps at least one)."""
    return np.uint8(255 ^ (2 ** (8 - int(bits)) - 1))


# timm's operation parameter -> the parameter DALI's augmentation takes
TIMM_TO_DALI = {
    "shear_x": augmentations.warp_x_param,
    "shear_y": augmentations.warp_y_param,
    "translate_x": augmentations.warp_x_param,
    "translate_y": augmentations.warp_y_param,
    "brightness": augmentations.shift_enhance_range,
    "contrast": augmentations.shift_enhance_range,
    "color": augmentations.shift_enhance_range,
    "sharpness": sharpness_kernel,
    "posterize": posterize_mask,
    "solarize_add": np.uint8,
}


def timm_augmentation(name: str, image_size: int):
    """DALI's augmentation `name` for timm's RandAugment: it takes the magnitude (0-10, negated for a
    negative sign) and computes the parameter with `timm_parameter`, as torch-uint8 does."""
    base = {
        "translate_x": augmentations.translate_x_no_shape,
        "translate_y": augmentations.translate_y_no_shape,
        "sharpness": sharpness,
        "equalize": equalize,
    }.get(name) or getattr(augmentations, name)
    if name in ("auto_contrast", "equalize", "invert", "identity"):  # no parameter
        return base

    def mag_to_param(level):
        level = round(float(level) * TIMM_LEVEL_STEPS) / TIMM_LEVEL_STEPS  # DALI's bins are float32: made exact
        param = np.asarray(TIMM_TO_DALI.get(name, float)(timm_parameter(name, level, image_size)))
        return param.astype(np.float32) if param.dtype == np.float64 else param

    signed = name not in UNSIGNED
    return base.augmentation(mag_range=(0, TIMM_MAX_LEVEL), randomly_negate=signed, mag_to_param=mag_to_param)


def dali_suite(augment: AutoAugment, image_size: int) -> list:
    """DALI's operations of `augment`'s suite, in the order of `augment.operations`, for images of
    `image_size`."""
    if augment.name == "rand_augment_timm":
        return [timm_augmentation(name, image_size) for name in augment.operations]
    ranges = MAGNITUDES[augment.name]
    if augment.name == "trivial_augment_wide":
        suite = get_trivial_augment_wide_suite()
    elif augment.name == "rand_augment":
        suite = get_rand_augment_suite(use_shape=False, max_translate_abs=augment.translate_range(image_size)[1])
    else:  # AutoAugment's ImageNet policy with torchvision's ranges: DALI's own policy has others
        signed = ("shear_x", "rotate", "color", "contrast")
        suite = [getattr(augmentations, name).augmentation(mag_range=ranges[name]) for name in signed]
        suite += [
            augmentations.posterize.augmentation(mag_range=ranges["posterize"]),
            augmentations.solarize.augmentation(mag_range=ranges["solarize"]),
            augmentations.auto_contrast,
            augmentations.invert,
            augmentations.identity,
        ]
    by_name = {operation.name: operation for operation in suite}
    by_name.update(
        sharpness=sharpness.augmentation(
            mag_range=ranges["sharpness"], randomly_negate=True, mag_to_param=sharpness_kernel
        ),
        equalize=equalize,
    )
    return [by_name[name] for name in augment.operations]


def auto_augment_images(images, augment: AutoAugment, image_size: int, operations, magnitude_bins, signs):
    """Each image through its drawn operations of DALI's suite, in order: per image, `operations`
    (indices into `OPERATIONS`), `magnitude_bins` and `signs` hold one entry per operation (drawn by
    the loader, `AutoAugment.draw`)."""
    suite = dali_suite(augment, image_size)
    for k in range(augment.operations_per_image):
        images = select(
            suite,
            operations[k],
            images,
            magnitude_bin=signed_bin(magnitude_bins[k], signs[k]),
            num_magnitude_bins=augment.magnitude_bins,
            fill_value=FILL,
            interp_type=types.INTERP_LINEAR,
        )
    return images


def imagenet_pipeline(auto_augment: AutoAugment = NO_AUTO_AUGMENT, **kwargs):
    """The pipeline of `imagenet_graph`; `kwargs` are its arguments and `pipeline_def`'s.

    Only with an `auto_augment` is it built with conditionals (`select` sends each image down the
    branch of its operation): without, the graph is the one measured in docs/PERFORMANCE.md.
    """
    return pipeline_def(imagenet_graph, enable_conditionals=auto_augment.enabled)(auto_augment=auto_augment, **kwargs)


def imagenet_graph(
    source: Callable[[], tuple],
    train: bool,
    image_size: int,
    val_resize: int,
    decode_on_gpu: bool,
    hw_decoder_load: float,
    output_float16: bool,
    raw_pixels: bool = False,
    auto_augment: AutoAugment = NO_AUTO_AUGMENT,
    interpolation: str = "bilinear",
):
    """Returns (images HWC normalized, labels); labels are moved to the GPU with the images.

    `source()` gives one batch per input (DALI tensor lists, or per-sample arrays), which must stay
    unchanged until the batch's outputs are out (no copy is made): the encoded images (uint8) and
    the labels (int64), and for train also each crop's (x, y) anchor and (width, height) in pixels
    (float32) and whether to flip it (int32). The graph itself draws nothing at random: crops and
    flips come from the source, so they do not depend on the pipeline's lifetime or on the
    decoding device. With `raw_pixels` the images are HWC uint8 pixels, not encoded bytes. With an
    `auto_augment` train also takes each image's operations, magnitude bins and signs (int32 arrays
    of one entry per operation). `interpolation` is the resizes' filter (the auto-augmentation's
    geometric operations stay bilinear).
    """
    resize_filter = RESIZE_FILTERS[interpolation]
    decoder_device = "mixed" if decode_on_gpu else "cpu"
    # EXIF orientation is ignored, as PIL and torchvision (and so every published ImageNet result)
    # do: DALI's default would rotate such photos and the backends would disagree on them.
    decode_args = {"output_type": types.RGB, "adjust_orientation": False}
    if decode_on_gpu:
        decode_args["hw_decoder_load"] = hw_decoder_load
    dtype = types.FLOAT16 if output_float16 else types.FLOAT
    if train:
        dtypes = [types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32]
        if auto_augment.enabled:
            dtypes += [types.INT32] * 3
        stored, labels, crop_anchor, crop_shape, flip, *operations = fn.external_source(
            source=source, num_outputs=len(dtypes), batch=True, no_copy=True, dtype=dtypes
        )
        window = dict(axis_names="WH", normalized_anchor=False, normalized_shape=False)
        if raw_pixels:
            # Copied whole to the GPU, then cropped there. Cutting the crop on the host first (DALI's
            # threads, pinned output) fed compiled ResNet-18 on an H100 no faster (0.951-0.952 of
            # synthetic against 0.959 on one machine, 0.866-0.877 against 0.855-0.879 on another) and
            # kept 1.2 more host cores busy (docs/PERFORMANCE.md, fourteenth session).
            images = fn.slice(stored.gpu() if decode_on_gpu else stored, crop_anchor, crop_shape, **window)
        else:  # only the crop's region of the JPEG is decoded
            images = fn.decoders.image_slice(
                stored, crop_anchor, crop_shape, device=decoder_device, **window, **decode_args
            )
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=resize_filter)
        if auto_augment.enabled:
            images = auto_augment_images(images, auto_augment, image_size, *operations)
        images = fn.crop_mirror_normalize(
            images, dtype=dtype, output_layout="HWC", mean=list(PIXEL_MEAN), std=list(PIXEL_STD), mirror=flip
        )
    else:
        stored, labels = fn.external_source(
            source=source, num_outputs=2, batch=True, no_copy=True, dtype=[types.UINT8, types.INT64]
        )
        if raw_pixels:
            images = stored.gpu() if decode_on_gpu else stored
        else:
            images = fn.decoders.image(stored, device=decoder_device, **decode_args)
        resize_y, resize_x = torchvision_resize_size(images, val_resize)
        images = fn.resize(images, resize_x=resize_x, resize_y=resize_y, interp_type=resize_filter, antialias=True)
        images = fn.crop_mirror_normalize(
            images,
            dtype=dtype,
            output_layout="HWC",
            crop=(image_size, image_size),
            crop_pos_x=torchvision_center(resize_x, image_size),
            crop_pos_y=torchvision_center(resize_y, image_size),
            mean=list(PIXEL_MEAN),
            std=list(PIXEL_STD),
        )
    if decode_on_gpu:
        labels = labels.gpu()
    return images, labels
