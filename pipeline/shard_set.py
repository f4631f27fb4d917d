"""Open a split of a shard directory: manifest, checks, and per-sample index entries.

Everything a reader needs comes from manifest.json and the .idx files (never a directory listing),
and the cheap checks run before the first step, so a missing, truncated or foreign file is an
error naming that file instead of a hang or an exception from deep inside DALI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shards.manifest import Manifest, read_manifest
from shards.tar_writer import DALI_INDEX_VERSION, ShardInfo


class ShardError(RuntimeError):
    """A shard directory that does not match its manifest."""


@dataclass
class ShardSet:
    directory: Path
    split: str
    manifest: Manifest
    shards: list[ShardInfo]
    indexes: list[list[str]]  # per shard, its index lines (one per sample), read and checked when opened

    @property
    def sizes(self) -> list[int]:
        return [s.samples for s in self.shards]

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def image_ext(self) -> str:
        """Each sample's image member: "jpg" (JPEG), or "ppm" (decoded pixels, `--train-raw-pixels`)."""
        return self.manifest.splits[self.split].image_ext

    def tar_path(self, shard: int) -> Path:
        return self.directory / self.shards[shard].file

    def index_lines(self, shard: int) -> list[str]:
        return self.indexes[shard]


def open_shard_set(directory: str | os.PathLike, split: str) -> ShardSet:
    """Read the manifest and check every listed shard of `split` (presence, size, index)."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError) as err:
        raise ShardError(str(err)) from err
    if split not in manifest.splits:
        raise ShardError(f"{directory / 'manifest.json'}: no {split!r} split (has {sorted(manifest.splits)})")
    shards = manifest.splits[split].shards
    if not shards:
        raise ShardError(f"{directory / 'manifest.json'}: the {split!r} split has no shards")
    for shard in shards:
        tar = directory / shard.file
        if not tar.is_file():
            raise ShardError(f"{tar}: listed in manifest.json but missing")
        size = tar.stat().st_size
        if size != shard.bytes:
            raise ShardError(f"{tar}: {size} bytes but manifest.json says {shard.bytes} (truncated or replaced?)")
        if not (directory / shard.index_file).is_file():
            raise ShardError(f"{directory / shard.index_file}: listed in manifest.json but missing")
    indexes = [_read_index(directory / s.index_file, s) for s in shards]
    return ShardSet(directory, split, manifest, shards, indexes)


def _read_index(path: Path, shard: ShardInfo) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != DALI_INDEX_VERSION or not header[1].isdigit():
        raise ShardError(f"{path}: not a DALI {DALI_INDEX_VERSION} index file")
    body = lines[1:]
    if int(header[1]) != len(body) or len(body) != shard.samples:
        raise ShardError(
            f"{path}: lists {len(body)} samples (header {header[1]}), "
            f"manifest.json says {shard.samples} for {shard.file}"
        )
    return body  # each line's offsets are checked against the tar's size by `sample_table.shard_table`


def index_members(line: str, index_path: Path, image_ext: str = "jpg") -> dict[str, tuple[int, int, str]]:
    """{extension: (offset, size, member name)} of one DALI v1.2 index line, which must have the
    image member (`image_ext`) and cls."""
    fields = line.split()
    try:
        if len(fields) % 4:
            raise ValueError(f"{len(fields)} fields, not groups of 4")
        members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)}
        missing = {image_ext, "cls"} - members.keys()
        if missing:
            raise ValueError(f"no {' or '.join(sorted(missing))} member")
    except ValueError as err:
        raise ShardError(f"{index_path}: bad index line {line[:80]!r} ({err})") from err
    return members


def sample_key(line: str) -> str:
    """The sample's key: its first member's name less the extension."""
    return line.split()[3].split(".", 1)[0]
