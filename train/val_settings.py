"""How val images are made and scored: crop size, resize, resize filter and mirroring. Each is the
setting the checkpoint was trained with unless its flag overrides it; an ensemble's members must
agree on it. Shared by `train.evaluate` and `tools.predict`, which score the same way."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.transforms import INTERPOLATIONS
from train.checkpoint import trained_interpolation
from train.config import ConfigError
from train.model import FIXED_SIZE_KEYWORDS


@dataclass(frozen=True)
class ValSettings:
    image_size: int  # center-crop size
    crop_pct: float  # the shorter side is resized to image_size / crop_pct before the crop
    interpolation: str  # of that resize
    flip: bool  # also score the mirrored image (mean of the two logits)


def crop_fraction(text: str) -> float:
    """argparse type of --crop-pct: a float in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_val_setting_flags(parser: argparse.ArgumentParser) -> None:
    """--image-size, --crop-pct, --interpolation and --flip/--no-flip, each defaulting to the checkpoint's."""
    parser.add_argument("--image-size", type=int, help="center-crop size (default: the checkpoint's resolution.val)")
    parser.add_argument(
        "--crop-pct",
        type=crop_fraction,
        help="resize to image size / this, then crop (default: the checkpoint's data.crop_pct)",
    )
    parser.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        help="of the val resize (default: the checkpoint's data.interpolation)",
    )
    flip_help = "also score each image mirrored, mean of the logits (default: the checkpoint's eval.flip)"
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, help=flip_help)


def shared_setting(checkpoints: list[dict], paths: list[str], read: Callable, what: str, flag: str) -> object:
    """A val setting every checkpoint of an ensemble must share, read from each by `read`; the
    first's where they agree, else an error naming the two that differ and the flag that decides."""
    first = read(checkpoints[0])
    for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):
        if read(checkpoint) != first:
            raise ConfigError(
                f"{path} was trained with {what} {read(checkpoint)}, {paths[0]} with {first}: the ensemble's members "
                f"are scored on the same images, so give {flag}"
            )
    return first


def val_settings(args: argparse.Namespace, checkpoints: list[dict], paths: list[str]) -> ValSettings:
    """The flags of `add_val_setting_flags` where given, else the checkpoints' own settings.

    Raises ConfigError where members disagree on a setting no flag decides, or where --image-size
    asks a model built for one input size (a ViT's position embeddings) for another."""
    for path, checkpoint in zip(paths, checkpoints, strict=True):
        name, trained_size = checkpoint["config"]["model"]["name"], checkpoint["config"]["resolution"]["val"]
        if name in FIXED_SIZE_KEYWORDS and args.image_size not in (None, trained_size):
            raise ConfigError(f"--image-size {args.image_size}: {name} ({path}) is built for {trained_size} px")

    def setting(given: object, read: Callable, what: str, flag: str) -> object:
        return given if given is not None else shared_setting(checkpoints, paths, read, what, flag)

    return ValSettings(
        image_size=setting(
            args.image_size, lambda c: c["config"]["resolution"]["val"], "resolution.val", "--image-size"
        ),
        crop_pct=setting(args.crop_pct, lambda c: c["config"]["data"]["crop_pct"], "data.crop_pct", "--crop-pct"),
        interpolation=setting(args.interpolation, trained_interpolation, "data.interpolation", "--interpolation"),
        flip=setting(args.flip, lambda c: c["config"]["eval"].get("flip", False), "eval.flip", "--flip/--no-flip"),
    )
