"""The host-side pieces of the train augmentation: image sizes from headers, crop windows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from pipeline.transforms import RRC_AREA, RRC_ASPECT_RATIO, random_resized_crops
from shards.image_header import UnreadableHeader, encoded_image_size


def encoded(image: Image.Image, format: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


def test_header_sizes_match_pil_on_the_real_photographs(real_photos):
    photos = list(real_photos.values())[:200]
    if not photos:
        pytest.skip("../shared/data/imagenet-sample is absent")
    for photo in photos:
        data = photo.read_bytes()
        width, height = Image.open(io.BytesIO(data)).size
        assert encoded_image_size(data) == (height, width), photo


@pytest.mark.parametrize(
    "mode, format, options",
    [
        ("RGB", "JPEG", {}),
        ("RGB", "JPEG", {"progressive": True}),
        ("RGB", "JPEG", {"exif": b"Exif\x00\x00" + b"\x00" * 64}),
        ("L", "JPEG", {}),
        ("CMYK", "JPEG", {}),
        ("RGB", "PNG", {}),
        ("L", "PNG", {}),
    ],
)
def test_header_sizes_of_jpeg_and_png_variants(mode, format, options):
    image = Image.new(mode, (123, 45))
    assert encoded_image_size(encoded(image, format, **options)) == (45, 123)


@pytest.mark.parametrize(
    "data", [b"", b"GIF89a" + b"\x00" * 40, b"\xff\xd8\xff\xe0\x00\x10JFIF", b"\xff\xd8" + b"\x00" * 64]
)
def test_unreadable_headers_are_errors(data):
    with pytest.raises(UnreadableHeader):
        encoded_image_size(data)


def noise_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 80, 3), dtype=np.uint8))


def test_a_jpeg_is_checked_up_to_its_scan_data():
    """DALI 2.4 crashes the process on a batch of 32 or more holding a JPEG whose markers before the
    scan cannot be parsed (shards/image_header.py), so the walk goes on past the frame header."""
    for options in ({}, {"progressive": True}):
        jpeg = encoded(noise_image(), "JPEG", **options)
        scan = jpeg.index(b"\xff\xda")
        garbage_before_scan = jpeg[:scan] + b"\x00garbage" + jpeg[scan:]
        with pytest.raises(UnreadableHeader, match=f"JPEG marker expected at byte {scan}"):
            encoded_image_size(garbage_before_scan)
        with pytest.raises(UnreadableHeader, match="runs past the end"):
            encoded_image_size(jpeg[: scan - 10])  # cut inside the segment before the scan
        with pytest.raises(UnreadableHeader, match="ends before its scan data"):
            encoded_image_size(jpeg[:scan])
        # Damage inside the scan data is the decoder's to report (DALI raises an error for it).
        assert encoded_image_size(jpeg[: (scan + len(jpeg)) // 2]) == (64, 80)


def test_a_png_is_checked_chunk_by_chunk():
    """DALI 2.4 crashes on any PNG it cannot decode in a batch of 32 or more: every chunk's CRC is checked."""
    png = encoded(noise_image(), "PNG")
    assert encoded_image_size(png) == (64, 80)
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    with pytest.raises(UnreadableHeader, match="IDAT.*CRC mismatch"):
        encoded_image_size(bytes(flipped))
    with pytest.raises(UnreadableHeader, match="runs past the end"):
        encoded_image_size(png[:100])
    with pytest.raises(UnreadableHeader, match="before its IEND"):
        encoded_image_size(png[:-12])


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (100, 400), (64, 64)])
def test_crop_windows_follow_torchvision(height, width):
    """Same distribution as torchvision's RandomResizedCrop.get_params, and always inside the image."""
    draws = 4000
    anchors, shapes = random_resized_crops(np.full(draws, height), np.full(draws, width), np.random.default_rng(0))
    x, y, w, h = anchors[:, 0], anchors[:, 1], shapes[:, 0], shapes[:, 1]
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= width).all() and (y + h <= height).all()
    assert (w >= 1).all() and (h >= 1).all()

    torch.manual_seed(0)
    image = torch.empty(1).expand(3, height, width)
    reference = np.array(
        [RandomResizedCrop.get_params(image, list(RRC_AREA), list(RRC_ASPECT_RATIO)) for _ in range(draws)], float
    )  # rows of (top, left, height, width)
    area, reference_area = w * h / (height * width), reference[:, 2] * reference[:, 3] / (height * width)
    assert abs(area.mean() - reference_area.mean()) < 0.02
    assert abs((w / h).mean() - (reference[:, 3] / reference[:, 2]).mean()) < 0.02
    assert abs((x / width).mean() - (reference[:, 1] / width).mean()) < 0.02
    assert abs((area == 1).mean() - (reference_area == 1).mean()) < 0.02


def test_crop_windows_are_a_function_of_the_seed():
    heights, widths = np.array([300, 400, 500]), np.array([500, 300, 500])
    first = random_resized_crops(heights, widths, np.random.default_rng([1, 2, 3]))
    again = random_resized_crops(heights, widths, np.random.default_rng([1, 2, 3]))
    other = random_resized_crops(heights, widths, np.random.default_rng([1, 2, 4]))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
