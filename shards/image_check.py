"""Decode each source image once: keep it, re-encode it, or reject it with a reason.

Content is judged by its bytes (PIL sniffs the format), never by the file name.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

KEEP_AS_IS_FORMATS = {"JPEG", "MPO"}  # MPO is a JPEG with extra camera frames appended
KEEP_AS_IS_MODES = {"RGB", "L"}  # grayscale JPEGs are kept; readers expand them to 3 channels


@dataclass(frozen=True)
class CheckedImage:
    jpeg: bytes | None  # bytes to store, None when rejected
    width: int = 0
    height: int = 0
    converted: str | None = None  # why the bytes were re-encoded (format or colour space)
    resized: bool = False  # shrunk to --max-short-side
    rejected: str | None = None  # why the file cannot be used


def check_image(path: str, max_short_side: int | None = None, quality: int = 90) -> CheckedImage:
    """Fully decode the file at `path` and return the JPEG bytes to store (or why not)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return CheckedImage(None, rejected=f"cannot read file: {err}")
    return check_image_bytes(data, max_short_side, quality)


def check_image_bytes(data: bytes, max_short_side: int | None = None, quality: int = 90) -> CheckedImage:
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
    if converted is None and not resized:
        return CheckedImage(data, image.width, image.height)

    if image.mode not in KEEP_AS_IS_MODES:
        image = image.convert("RGB")
    if resized:
        scale = max_short_side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return CheckedImage(out.getvalue(), image.width, image.height, converted=converted, resized=resized)
