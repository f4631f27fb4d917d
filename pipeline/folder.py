"""Reading an ImageNet folder directly (no shards): file lists and the original Dataset interface."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torchvision import datasets

from pipeline.transforms import torchvision_train_transform, torchvision_val_transform
from shards.image_check import rgb_image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Sorted image paths under `root/<class>/` and their labels (class index = sorted folder order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        flat = any(p.is_file() for p in root.iterdir())
        raise ValueError(
            f"{root}: no class folders (expected {root}/<wnid>/*.JPEG)"
            + (
                "; a flat folder such as ImageNet's val needs its labels: convert it with tools.make_shards "
                "--val-labels (docs/shards.md) and train from the shards"
                if flat
                else ""
            )
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, filename))
                    labels.append(label)
    if not files:
        raise ValueError(f"{root}: no images found")
    return files, labels


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, but 16-bit grayscale scaled to 8 bits as DALI decodes it (not clipped)."""
    with Image.open(path) as image:
        return rgb_image(image)


class ImageNetDataset(datasets.ImageFolder):
    """DI-engine's original interface: a map-style Dataset over `path/<class>/*.JPEG`.

    Returns (image tensor normalized, class index) with the train or val transform.
    """

    def __init__(self, path: str | os.PathLike, is_training: bool, image_size: int = 224):
        transform = torchvision_train_transform(image_size) if is_training else torchvision_val_transform(image_size)
        super().__init__(str(path), transform=transform, loader=load_rgb)
        self.is_training = is_training
