"""manifest.json: the one description of a shard directory that every later tool reads."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.classes import ClassInfo
from shards.tar_writer import ShardInfo, write_atomically

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
MIN_LABEL_DIGITS = 4


def label_digits(num_classes: int) -> int:
    """How many ASCII digits each `.cls` member holds: 4 (0042) up to 10,000 classes, so that every
    label of a split has one fixed width (DALI reads it as a fixed-size component), more beyond
    (ImageNet-21k's 21,841 classes: 5)."""
    return max(MIN_LABEL_DIGITS, len(str(max(num_classes - 1, 0))))


@dataclass(frozen=True)
class FileNote:
    """An input file that was rejected, or kept after re-encoding; `path` is relative to the split root."""

    split: str
    path: str
    reason: str


@dataclass
class SplitInfo:
    samples: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    resized: int = 0  # shrunk to `max_short_side` and re-encoded
    max_short_side: int | None = None  # images whose shorter side was larger are stored shrunk to it
    image_ext: str = "jpg"  # each sample's image member: "jpg" (JPEG) or "ppm" (decoded RGB pixels)


@dataclass
class Manifest:
    classes: list[ClassInfo]
    splits: dict[str, SplitInfo]
    rejected: list[FileNote]
    converted: list[FileNote]
    options: dict
    format_version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, ensure_ascii=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(
            classes=[ClassInfo(**c) for c in data["classes"]],
            splits={
                name: SplitInfo(
                    samples=s["samples"],
                    shards=[ShardInfo(**sh) for sh in s["shards"]],
                    resized=s.get("resized", 0),
                    # manifests written before per-split limits hold one limit for both splits
                    max_short_side=s.get("max_short_side", data["options"].get("max_short_side")),
                    image_ext=s.get("image_ext", "jpg"),
                )
                for name, s in data["splits"].items()
            },
            rejected=[FileNote(**r) for r in data["rejected"]],
            converted=[FileNote(**r) for r in data["converted"]],
            options=data["options"],
            format_version=data["format_version"],
        )


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_NAME
    write_atomically(path, manifest.to_json().encode())
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Load `directory/manifest.json`; a missing, unreadable or foreign file is a clear error."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (is this a directory written by tools.make_shards?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = data.get("format_version")
        if version != MANIFEST_VERSION:
            raise ValueError(f"format_version {version!r}, this code reads {MANIFEST_VERSION}")
        return Manifest.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a valid manifest: {err}") from err


def manifest_digest(directory: str | os.PathLike) -> str:
    """The first 16 hex digits of manifest.json's sha256: the same digest, the same conversion."""
    return hashlib.sha256((Path(directory) / MANIFEST_NAME).read_bytes()).hexdigest()[:16]
