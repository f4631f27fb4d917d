"""Open a split of a shard directory: manifest, checks, and per-sample index entries.

Everything a reader needs comes from manifest.json and the .idx files (never a directory listing),
and the cheap checks run before the first step, so a missing, truncated or foreign file is an
error naming that file instead of a hang or an exception from deep inside DALI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.split import RankPart
from shards.manifest import Manifest, read_manifest
from shards.tar_writer import DALI_INDEX_VERSION, ShardInfo


class ShardError(RuntimeError):
    """A shard directory that does not match its manifest."""


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image and label lie inside a tar (from the .idx line)."""

    tar_path: str
    key: str
    jpg_offset: int
    jpg_size: int
    cls_offset: int
    cls_size: int


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

    def tar_path(self, shard: int) -> Path:
        return self.directory / self.shards[shard].file

    def index_lines(self, shard: int) -> list[str]:
        return self.indexes[shard]

    def sample_refs(self, part: RankPart) -> list[SampleRef]:
        refs = []
        for piece in part.pieces:
            tar = str(self.tar_path(piece.shard))
            for line in self.index_lines(piece.shard)[piece.start : piece.stop]:
                refs.append(_parse_index_line(tar, line))
        return refs


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
    for line in body[-1:]:  # the last sample must end inside the tar
        ref = _parse_index_line(shard.file, line, path)
        end = max(ref.jpg_offset + ref.jpg_size, ref.cls_offset + ref.cls_size)
        if end > shard.bytes:
            raise ShardError(f"{path}: does not match {shard.file} (sample {ref.key} ends past the tar's end)")
    return body


def _parse_index_line(tar_path: str, line: str, index_path: Path | None = None) -> SampleRef:
    fields = line.split()
    parts = {}
    try:
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            parts[ext] = (int(offset), int(size), name)
        jpg, cls = parts["jpg"], parts["cls"]
    except (ValueError, KeyError) as err:
        where = index_path or tar_path
        raise ShardError(f"{where}: bad index line {line[:80]!r} ({err})") from err
    return SampleRef(tar_path, jpg[2].split(".", 1)[0], jpg[0], jpg[1], cls[0], cls[1])
