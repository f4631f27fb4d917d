"""Reading the small text files a user hands the converter (`--classes`, `--val-labels`)."""

from __future__ import annotations

import os
from pathlib import Path


def read_text_file(path: str | os.PathLike, option: str) -> str:
    """The text of `path`, given as `option`: UTF-8, with or without the byte-order mark that Windows
    editors write (it would otherwise join the first wnid). A ValueError that names the option and
    the file where it cannot be read or is not UTF-8."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot be read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{option} {path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
