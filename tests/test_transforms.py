"""The host-side pieces of the train augmentation: image sizes from headers, crop windows."""

from __future__ import annotations

import io
import re
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from pipeline.transforms import RRC_AREA, RRC_ASPECT_RATIO, random_resized_crops
from shards.image_header import UnreadableHeader, encoded_image_size, ppm_header


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


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


FRAME_64x80 = jpeg_segment(0xC0, bytes([8, 0, 64, 0, 80, 3]) + bytes(9))  # baseline: 8 bit, 64 high, 80 wide
SCAN = jpeg_segment(0xDA, bytes(10))
PNG_IHDR = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", (80).to_bytes(4, "big") + (64).to_bytes(4, "big") + bytes(5))


@pytest.mark.parametrize(
    "data, size_or_error",
    [
        (b"\xff\xd8\xff" + FRAME_64x80 + SCAN, (64, 80)),  # a fill byte before a marker
        (b"\xff\xd8\xff\xd0\xff\x01" + FRAME_64x80 + SCAN, (64, 80)),  # RST0 and TEM have no length
        (b"\xff\xd8" + jpeg_segment(0xC2, bytes([8, 0, 64])) + SCAN, "frame header at byte 2 is too short"),
        (b"\xff\xd8" + jpeg_segment(0xC0, bytes([8, 0, 0, 0, 80, 3]) + bytes(9)) + SCAN, "gives a 80x0 image"),
        (b"\xff\xd8" + SCAN + FRAME_64x80, "scan before any frame header"),
        (b"\xff\xd8" + jpeg_segment(0xE0, b"JFIF\x00" + bytes(9)) + SCAN, "scan before any frame header"),
        (b"\xff\xd8" + jpeg_segment(0xE0, b"JFIF\x00" + bytes(9)), "no JPEG frame header"),
        (PNG_IHDR + png_chunk(b"IEND", b""), (64, 80)),
        (PNG_IHDR[:8] + png_chunk(b"tEXt", b"a\x00b") + PNG_IHDR[8:], "does not start with its IHDR chunk"),
        (PNG_IHDR[:8] + png_chunk(b"IHDR", bytes(13)) + png_chunk(b"IEND", b""), "PNG header gives a 0x0 image"),
    ],
)
def test_header_walk_edge_cases(data, size_or_error):
    """The header walk on hand-made headers: what JPEG allows between markers, and what it and PNG
    must not hold (each error, as the converter and verify_shards report it)."""
    if isinstance(size_or_error, tuple):
        assert encoded_image_size(data) == size_or_error
    else:
        with pytest.raises(UnreadableHeader, match=re.escape(size_or_error)):
            encoded_image_size(data)


@pytest.mark.parametrize(
    "head, header_or_error",
    [
        (b"P6 4 3 255\n", (3, 4)),
        (b"P6\n# made by hand\n4 3\t# two comments\r\n255 ", (3, 4)),
        (b"P5 4 3 255\n", "not a binary PPM"),
        (b"P6 4 x 255\n", "width, height and maximum value expected"),
        (b"P6 4 3 255", "no whitespace before the pixels"),
        (b"P6 4 3 65535\n", "PPM of 4x3 with maximum value 65535: 8-bit RGB expected"),
        (b"P6 0 3 255\n", "PPM of 0x3 with maximum value 255"),
    ],
)
def test_ppm_headers(head, header_or_error):
    """Raw-pixel samples' headers: height, width and where the pixels start (comments allowed)."""
    data = head + bytes(36) if head.endswith((b"\n", b" ")) else head
    if isinstance(header_or_error, tuple):
        assert ppm_header(data) == (*header_or_error, len(head))  # the pixels follow the header
    else:
        with pytest.raises(UnreadableHeader, match=re.escape(header_or_error)):
            ppm_header(data)


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


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits_as_dali_decodes_it(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values at 255 (a gradient turns almost all white); the
    PIL readers (ImageNetDataset, tools.predict) give DALI's decoding of the same PNG instead."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.folder import ImageNetDataset
    from shards.image_check import rgb_image
    from tools.predict import ImageFiles

    gradient = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    png16 = encoded(Image.fromarray(gradient), "PNG")

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        data = fn.external_source(source=lambda: [np.frombuffer(png16, dtype=np.uint8)], batch=True)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    by_dali = np.asarray(pipe.run()[0][0])
    ours = np.asarray(rgb_image(Image.open(io.BytesIO(png16))))
    assert np.array_equal(ours, by_dali) and 120 < ours.mean() < 135
    assert (np.asarray(Image.open(io.BytesIO(png16)).convert("RGB")) == 255).mean() > 0.9  # what it replaces

    for name in ("sixteen", "eight"):
        (tmp_path / "photos" / name).mkdir(parents=True)
    (tmp_path / "photos" / "sixteen" / "a.png").write_bytes(png16)
    Image.fromarray(by_dali).save(tmp_path / "photos" / "eight" / "a.png")
    folder = ImageNetDataset(tmp_path / "photos", is_training=False, image_size=32)
    assert torch.equal(folder[0][0], folder[1][0])
    files = ImageFiles([str(p) for p in sorted((tmp_path / "photos").rglob("*.png"))], folder.transform)
    assert torch.equal(files[0], files[1]) and torch.equal(files[0], folder[0][0])
