"""Check a shard directory against its manifest: files, checksums, index files, samples, labels."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from PIL import Image

from shards.image_header import PPM_HEADER_MAX_BYTES, UnreadableHeader, encoded_image_size
from shards.manifest import Manifest, label_digits, read_manifest
from shards.tar_writer import ShardInfo, index_line, index_text
from shards.worker_pool import worker_pool

READ_CHUNK_BYTES = 1 << 20


def verify_directory(directory: str | os.PathLike, decode: bool = False, workers: int = 1) -> list[str]:
    """Every problem found, one line each naming the shard (and sample); empty when all holds."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError) as err:
        return [str(err)]
    problems = _manifest_problems(directory, manifest)
    shards = [(shard, info.image_ext) for info in manifest.splits.values() for shard in info.shards]
    check = partial(check_shard, directory, num_classes=len(manifest.classes), decode=decode)
    if workers > 1 and len(shards) > 1:
        with worker_pool(workers) as pool:
            per_shard = pool.starmap(check, shards, chunksize=1)
    else:
        per_shard = [check(*job) for job in shards]
    for lines in per_shard:
        problems += lines
    return problems


def _manifest_problems(directory: Path, manifest: Manifest) -> list[str]:
    problems = []
    listed = set()
    for split, info in manifest.splits.items():
        counted = sum(s.samples for s in info.shards)
        if counted != info.samples:
            problems.append(f"manifest.json: {split} says {info.samples} samples, its shards add up to {counted}")
        listed |= {s.file for s in info.shards} | {s.index_file for s in info.shards}
    for path in sorted(directory.glob("*-*.tar")) + sorted(directory.glob("*-*.idx")):
        if path.name not in listed:
            problems.append(f"{path.name}: in the directory but not listed in manifest.json")
    return problems


def check_shard(
    directory: str | os.PathLike, shard: ShardInfo, image_ext: str, *, num_classes: int, decode: bool = False
) -> list[str]:
    """Problems of one shard: size, checksum, tar structure, index, labels and (optionally) images.

    `image_ext` is the split's image member (manifest.json): "jpg", or "ppm" for raw pixels.
    """
    tar_path = Path(directory) / shard.file
    name = shard.file
    if not tar_path.is_file():
        return [f"{name}: missing"]
    problems = []
    size = tar_path.stat().st_size
    if size != shard.bytes:
        problems.append(f"{name}: {size} bytes, manifest says {shard.bytes}")
    scan = _ShardScan(tar_path)
    try:
        samples = 0
        for key, parts in scan.samples():
            samples += 1
            problems += [f"{name}: sample {key}: {p}" for p in _sample_problems(parts, image_ext, num_classes, decode)]
        if samples != shard.samples:
            problems.append(f"{name}: {samples} samples, manifest says {shard.samples}")
    except (tarfile.TarError, EOFError, OSError) as err:
        problems.append(f"{name}: unreadable tar: {err}")
    if scan.sha256 != shard.sha256:
        problems.append(f"{name}: sha256 differs from the manifest (file changed or corrupt)")
    if scan.index is None:
        return problems
    index_path = Path(directory) / shard.index_file
    if not index_path.is_file():
        problems.append(f"{shard.index_file}: missing")
    elif index_path.read_text(encoding="utf-8", errors="replace") != scan.index:
        problems.append(f"{shard.index_file}: does not match {name} (offsets, sizes or names differ)")
    return problems


class _HashingReader:
    """Hashes every byte read through it, so parsing the tar also checksums it."""

    def __init__(self, raw):
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data


class _ShardScan:
    """One sequential read of a shard: its samples, its sha256 and the DALI index rebuilt from it.

    A single pass because a full verify reads every byte of the dataset (140 GB for ImageNet).
    `sha256` and `index` are set once `samples()` is exhausted (`index` stays None if the tar is unreadable).
    """

    def __init__(self, tar_path: Path):
        self.tar_path = tar_path
        self.sha256: str | None = None
        self.index: str | None = None

    def samples(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Group consecutive members by key, as webdataset and DALI do."""
        with open(self.tar_path, "rb") as raw:
            reader = _HashingReader(raw)
            try:
                yield from self._members(reader)
            finally:
                while reader.read(READ_CHUNK_BYTES):  # hash the rest: end blocks, or all after a tar error
                    pass
                self.sha256 = reader.digest.hexdigest()

    def _members(self, reader: _HashingReader) -> Iterator[tuple[str, dict[str, bytes]]]:
        key, parts, lines, entries = None, {}, [], []
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # streaming: no seeks, one read
            for member in tar:
                member_key, _, ext = member.name.partition(".")
                if member_key != key:
                    if key is not None:
                        yield key, parts
                        lines.append(index_line(entries))
                    key, parts, entries = member_key, {}, []
                data = tar.extractfile(member)
                parts[ext] = data.read() if data is not None else b""
                entries.append((ext, member.offset_data, member.size, member.name))
        if key is not None:
            yield key, parts
            lines.append(index_line(entries))
        self.index = index_text(lines)


def _sample_problems(parts: dict[str, bytes], image_ext: str, num_classes: int, decode: bool) -> list[str]:
    problems = []
    expected = sorted(("cls", image_ext, "json"))
    if sorted(parts) != expected:
        problems.append(f"has components {sorted(parts)}, expected {expected}")
    label_text = parts.get("cls", b"")
    digits = label_digits(num_classes)
    if not (len(label_text) == digits and label_text.isdigit()):
        problems.append(f"label {label_text!r} is not {digits} ASCII digits")
    elif int(label_text) >= num_classes:
        problems.append(f"label {int(label_text)} out of range 0..{num_classes - 1}")
    if "json" in parts:
        try:
            json.loads(parts["json"])
        except ValueError:
            problems.append("metadata .json does not parse")
    if image_ext == "jpg" and "jpg" in parts:
        try:
            encoded_image_size(parts["jpg"])
        except UnreadableHeader as err:
            problems.append(f"JPEG header that DALI cannot parse: {err}")
    if decode and image_ext in parts:
        data = parts[image_ext]
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image_ext == "jpg" and image.format not in ("JPEG", "MPO"):
                    problems.append(f"image is {image.format}, not JPEG")
                if image_ext == "ppm":
                    pixel_bytes = image.width * image.height * 3
                    if image.format != "PPM" or image.mode != "RGB":
                        problems.append(f"image is {image.format} {image.mode}, not an RGB PPM")
                    elif not 0 < len(data) - pixel_bytes <= PPM_HEADER_MAX_BYTES:
                        problems.append(f"PPM of {len(data)} bytes for {image.width}x{image.height} RGB pixels")
                image.load()
        except Exception as err:  # PIL raises many types for bad data
            problems.append(f"image does not decode: {err}")
    return problems
