"""Decode each source image once: keep it, re-encode it, store its pixels, or reject it with a reason.

Content is judged by its bytes (PIL sniffs the format), never by the file name.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from shards.image_header import UnreadableHeader, encoded_image_size

KEEP_AS_IS_FORMATS = {"JPEG", "MPO"}  # MPO is a JPEG with extra camera frames appended
KEEP_AS_IS_MODES = {"RGB", "L"}  # grayscale JPEGs are kept; readers expand them to 3 channels
SIXTEEN_BIT_GRAY_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # how Pillow opens 16-bit grayscale PNG and TIFF


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, 16-bit grayscale scaled to 8 bits as DALI's decoder scales it.

    Pillow's own `convert("RGB")` clips 16-bit values at 255, which turns nearly all of such a
    picture white; every PIL reader of this project converts through here instead.
    """
    if image.mode in SIXTEEN_BIT_GRAY_MODES:
        image = Image.fromarray(((np.asarray(image).astype(np.uint32) + 128) // 257).astype(np.uint8))
    return image.convert("RGB")


@dataclass(frozen=True)
class CheckedImage:
    encoded: bytes | None  # bytes to store (JPEG, or PPM with raw_pixels), None when rejected
    width: int = 0
    height: int = 0
    converted: str | None = None  # why the bytes were re-encoded (format or colour space)
    resized: bool = False  # shrunk to --max-short-side
    rejected: str | None = None  # why the file cannot be used


def check_image_bytes(
    data: bytes, max_short_side: int | None = None, quality: int = 90, raw_pixels: bool = False
) -> CheckedImage:
    """Fully decode `data` (a source image's bytes) and return the bytes to store, or why not.

    With `raw_pixels`, what is stored is the decoded RGB pixels as a binary PPM (a header of about
    15 bytes, then height x width x 3 bytes): readers then skip JPEG decoding altogether.
    """
    if not data:
        return CheckedImage(None, rejected="empty file (0 bytes)")
    source_format = "unknown"
    try:
        image = Image.open(io.BytesIO(data))
        source_format = image.format or "unknown"
        image.load()  # the full decode; truncated or corrupt data raises here
    except Image.DecompressionBombError as err:
        return CheckedImage(None, rejected=f"image too large: {err}")
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        if "cannot identify image file" in str(err):
            return CheckedImage(None, rejected="not an image (content matches no known image format)")
        return CheckedImage(None, rejected=f"cannot decode {source_format} data: {err}")

    converted = None
    if source_format not in KEEP_AS_IS_FORMATS:
        converted = f"{source_format} content re-encoded as JPEG"
    elif image.mode not in KEEP_AS_IS_MODES:
        converted = f"{image.mode} JPEG re-encoded as RGB"
    resized = max_short_side is not None and min(image.size) > max_short_side
    if converted is None and not resized and not raw_pixels:
        try:
            encoded_image_size(data)
            return CheckedImage(data, image.width, image.height)
        except UnreadableHeader as err:  # PIL's libjpeg skips stray bytes between markers; DALI cannot
            converted = f"JPEG re-encoded: its header cannot be parsed by DALI ({err})"

    if image.mode not in KEEP_AS_IS_MODES or (raw_pixels and image.mode != "RGB"):
        image = rgb_image(image)
    if resized:
        scale = max_short_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    if raw_pixels:
        image.save(out, format="PPM")
    else:
        image.save(out, format="JPEG", quality=quality)
    return CheckedImage(out.getvalue(), image.width, image.height, converted=converted, resized=resized)
