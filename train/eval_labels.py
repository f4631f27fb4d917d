"""Right answers of test sets whose labels are not the model's outputs one for one: shards of some
of its classes (ImageNet-A's and ImageNet-R's 200, matched by wnid) and ImageNet-ReaL's label sets
for ImageNet's val images (matched by file name). Used by `train.evaluate`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shards.classes import imagenet_wnids
from train.checkpoint import CheckpointError, check_same_classes
from train.config import ConfigError
from train.metrics import NO_LABEL

REAL_IMAGES = 50_000  # ImageNet's val images, which ImageNet-ReaL relabelled
REAL_KEY = re.compile(r"ILSVRC2012_val_(\d{8})")


def check_classes_match(checkpoint: dict, path: str, num_classes: int, wnids: list[str], data: str) -> None:
    """`check_same_classes`, naming `--class-subset` where the shards hold some of the model's classes."""
    try:
        check_same_classes(checkpoint, path, num_classes, wnids, data)
    except CheckpointError as err:
        saved = {wnid for wnid, _ in checkpoint.get("classes") or []}
        if wnids and set(wnids) <= saved:
            raise CheckpointError(
                f"{err}; all {len(wnids)} classes of {data} are among the model's {len(saved)}: --class-subset "
                "predicts among them only (as ImageNet-A and ImageNet-R are scored)"
            ) from err
        raise


def class_columns(checkpoint: dict, path: str, wnids: list[str], data: str) -> torch.Tensor:
    """For each label of `data`, the model output of the same wnid (`--class-subset`)."""
    saved = [wnid for wnid, _ in checkpoint.get("classes") or []]
    if not saved:
        raise CheckpointError(
            f"{path}: records no class wnids (a run on synthetic data), so --class-subset cannot match"
        )
    output_of = {wnid: i for i, wnid in enumerate(saved)}
    unknown = [wnid for wnid in wnids if wnid not in output_of]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} of the {len(wnids)} classes of {data} are not among the model's {len(saved)}, "
            f"e.g. {unknown[:5]}"
        )
    return torch.tensor([output_of[wnid] for wnid in wnids])


def check_imagenet_classes(checkpoint: dict, path: str) -> None:
    """ReaL's labels are indices of ImageNet-1k's classes in sorted wnid order: the model's must be those."""
    saved = [wnid for wnid, _ in checkpoint.get("classes") or []]
    imagenet = imagenet_wnids()
    if saved != imagenet:
        if len(saved) != len(imagenet):
            found = f"{len(saved)} classes recorded" if saved else "no class wnids recorded (a run on synthetic data)"
        else:
            first = next(i for i, (a, b) in enumerate(zip(saved, imagenet, strict=True)) if a != b)
            found = f"its class {first} is {saved[first]}, ImageNet's is {imagenet[first]}"
        raise ConfigError(
            f"--real-labels: ReaL labels ImageNet-1k's 1000 classes in sorted wnid order, and {path} has {found}"
        )


def real_label_sets(path: str, loader, data: str) -> torch.Tensor:
    """ImageNet-ReaL's label set of each sample the loader yields on this rank, in its order, as
    `train.metrics.evaluate` takes them: a row of class indices per sample, filled with NO_LABEL.

    real.json lists the sets in the order of ImageNet's val file names (ILSVRC2012_val_00000001 is
    the first); a sample is matched by its key, the converter's name for it (the file name less
    its extension)."""
    try:
        sets = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--real-labels {path}: cannot be read as JSON ({err})") from err
    valid = (
        isinstance(sets, list)
        and len(sets) == REAL_IMAGES
        and all(
            isinstance(labels, list) and all(isinstance(c, int) and 0 <= c < 1000 for c in labels) for labels in sets
        )
    )
    if not valid:
        raise ConfigError(
            f"--real-labels {path}: not ReaL's real.json (a list of {REAL_IMAGES} lists of class indices 0-999)"
        )
    keys = loader.sample_keys()
    rows = torch.full((len(keys), max(len(labels) for labels in sets)), NO_LABEL, dtype=torch.int64)
    for row, key in enumerate(keys):
        match = REAL_KEY.fullmatch(key)
        if match is None or not 1 <= int(match[1]) <= REAL_IMAGES:
            raise ConfigError(
                f"--real-labels: sample {key} of {data} is not one of ImageNet's val images "
                f"(ILSVRC2012_val_00000001 to ILSVRC2012_val_{REAL_IMAGES:08d}), which ReaL labels"
            )
        labels = sets[int(match[1]) - 1]
        rows[row, : len(labels)] = torch.tensor(labels, dtype=torch.int64)
    return rows
