"""Make a small ImageNet-style folder for the demo and the tests.

    python -m tools.make_demo_data --out /tmp/demo-imagenet [--classes 10] [--train-per-class 24]

Writes `train/<wnid>/<wnid>_<n>.JPEG`, a flat `val/ILSVRC2012_val_<n>.JPEG` and `val_labels.txt`
('filename wnid' lines). Images are random crops and flips of the real ILSVRC-2012 photographs in
../shared/data/imagenet-sample when that folder exists, otherwise generated pictures with a
class-specific colour and stripe pattern, so the set is learnable either way. `pack_train_archive`
and `pack_flat_archive` pack such folders as image-net.org ships them (tests, tools.bench_convert).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from shards.classes import imagenet_wnids

# ../shared/data/imagenet-sample beside the checkout, or IMAGENET_SAMPLE_DIR (e.g. on the GPU machine).
SHARED_SAMPLE_DIR = Path(
    os.environ.get(
        "IMAGENET_SAMPLE_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
    )
)
DEMO_SHORT_SIDE = 160  # small images keep the demo fast on two CPU cores
DEMO_JPEG_QUALITY = 90


def real_sample_images(sample_dir: Path = SHARED_SAMPLE_DIR) -> dict[str, Path]:
    """wnid -> path of the real photograph of that class, or {} when the folder is absent."""
    if not sample_dir.is_dir():
        return {}
    return {p.name.split("_", 1)[0]: p for p in sorted(sample_dir.glob("n*.JPEG"))}


def link_sample_tree(root: str | Path, copies: int = 1, sample_dir: Path = SHARED_SAMPLE_DIR) -> Path | None:
    """`root/train/<wnid>/` with links to the real photographs, each linked `copies` times.

    For benchmarks: the same real files, more of them, without copying 107 MB each time.
    Returns None where the sample folder is absent.
    """
    photos = real_sample_images(sample_dir)
    if not photos:
        return None
    train = Path(root) / "train"
    for wnid, photo in photos.items():
        (train / wnid).mkdir(parents=True)
        for copy in range(copies):
            (train / wnid / f"{copy}_{photo.name}").symlink_to(photo)
    return train


def _generated_image(class_number: int, rng: random.Random) -> Image.Image:
    hue = (class_number * 0.61803) % 1.0
    base = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 220)).convert("RGB"))[0, 0]
    height, width = 120 + rng.randrange(60), 120 + rng.randrange(60)
    stripes = np.sin(np.arange(width) * (0.1 + 0.05 * (class_number % 7)) + rng.random() * 6.28)
    pixels = base[None, None, :] * (0.75 + 0.25 * stripes[None, :, None])
    pixels = pixels + np.asarray(np.random.default_rng(rng.randrange(1 << 30)).normal(0, 12, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _variant(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop (35-100% of the area) and flip of `photo`, scaled to the demo size."""
    width, height = photo.size
    scale = rng.uniform(0.35, 1.0) ** 0.5
    crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
    left, top = rng.randrange(width - crop_w + 1), rng.randrange(height - crop_h + 1)
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    ratio = DEMO_SHORT_SIDE / min(image.size)
    return image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))))


def build_demo_imagenet(
    out: str | Path,
    num_classes: int = 10,
    train_per_class: int = 24,
    val_per_class: int = 6,
    seed: int = 0,
    sample_dir: Path = SHARED_SAMPLE_DIR,
) -> Path:
    """Write the demo folder under `out` and return it; classes are spread over ImageNet's 1000."""
    out = Path(out)
    rng = random.Random(seed)
    all_wnids = imagenet_wnids()
    wnids = [all_wnids[i * len(all_wnids) // num_classes] for i in range(num_classes)]
    photos = real_sample_images(sample_dir)
    val_lines = []
    val_number = 0
    for class_number, wnid in enumerate(wnids):
        photo = Image.open(photos[wnid]).convert("RGB") if wnid in photos else None
        (out / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class + val_per_class):
            image = _variant(photo, rng) if photo is not None else _generated_image(class_number, rng)
            if i < train_per_class:
                image.save(out / "train" / wnid / f"{wnid}_{i}.JPEG", quality=DEMO_JPEG_QUALITY)
            else:
                val_number += 1
                name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                (out / "val").mkdir(exist_ok=True)
                image.save(out / "val" / name, quality=DEMO_JPEG_QUALITY)
                val_lines.append(f"{name} {wnid}\n")
    (out / "val_labels.txt").write_text("".join(val_lines))
    return out


def pack_train_archive(train: Path, archive: Path) -> Path:
    """A tar of `<wnid>.tar` class archives, laid out as ILSVRC2012_img_train.tar."""
    staging = archive.parent / "class-tars"
    staging.mkdir()
    with tarfile.open(archive, "w", dereference=True) as outer:
        for folder in sorted(train.iterdir()):
            class_tar = staging / f"{folder.name}.tar"
            with tarfile.open(class_tar, "w", dereference=True) as inner:
                for image in sorted(folder.iterdir()):
                    inner.add(image, arcname=image.name)
            outer.add(class_tar, arcname=class_tar.name)
    shutil.rmtree(staging)
    return archive


def pack_flat_archive(folder: Path, archive: Path) -> Path:
    """A tar of the files of `folder`, laid out as ILSVRC2012_img_val.tar."""
    with tarfile.open(archive, "w", dereference=True) as tar:
        for image in sorted(folder.iterdir()):
            tar.add(image, arcname=image.name)
    return archive


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.make_demo_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=24)
    p.add_argument("--val-per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = build_demo_imagenet(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed)
    source = "real sample photographs" if real_sample_images() else "generated pictures"
    print(f"make_demo_data: {out} ({args.classes} classes, from {source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
