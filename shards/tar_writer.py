"""Write one shard: a deterministic USTAR tar plus the DALI index beside it, both atomically.

Headers come from the standard `tarfile` module; the archive is assembled here rather than with
webdataset's TarWriter because the index needs each member's byte offset as it is written (one
pass, no GNU tar), every header field must be fixed (mtime 0, uid/gid 0, no user names) for
byte-identical reruns, and member bytes are built in the worker processes (see encode_sample).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

TAR_BLOCK_BYTES = 512
DALI_INDEX_VERSION = "v1.2"  # the version DALI's wds2idx writes
MEMBER_MODE = 0o644


@dataclass(frozen=True)
class ShardInfo:
    file: str
    index_file: str
    samples: int
    bytes: int
    sha256: str


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: `path` is either absent or complete, and a failed
    write (a full disk, a directory in the way) leaves no temporary file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class EncodedSample:
    """One sample's tar members, headers and padding included, ready to append to a shard."""

    blob: bytes
    members: list[tuple[str, int, int, str]]  # (extension, data offset within blob, size, member name)


def encode_sample(key: str, components: list[tuple[str, bytes]]) -> EncodedSample:
    """Build the tar bytes of `<key>.<ext>` members; runs in the worker processes.

    Member bytes do not depend on where they land in the archive, so building them here keeps the
    single writer process down to one write per sample.
    """
    chunks, members, position = [], [], 0
    for ext, data in components:
        name = f"{key}.{ext}"
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = MEMBER_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
        padding = -len(data) % TAR_BLOCK_BYTES
        chunks += [header, data, b"\0" * padding]
        members.append((ext, position + len(header), len(data), name))
        position += len(header) + len(data) + padding
    return EncodedSample(b"".join(chunks), members)


class ShardWriter:
    """Appends encoded samples to `<stem>.tar` and `<stem>.idx`; both appear only on `close()`."""

    def __init__(self, directory: str | os.PathLike, stem: str):
        self.directory = Path(directory)
        self.tar_path = self.directory / f"{stem}.tar"
        self.index_path = self.directory / f"{stem}.idx"
        self._tmp_path = self.directory / f"{stem}.tar.tmp"
        self._tmp_index_path = self.directory / f"{stem}.idx.tmp"
        self._file = open(self._tmp_path, "wb")
        self._digest = hashlib.sha256()
        self._index_lines: list[str] = []
        self.bytes_written = 0
        self.samples = 0

    def add(self, sample: EncodedSample) -> None:
        base = self.bytes_written
        self._write(sample.blob)
        self._index_lines.append(index_line([(ext, base + at, size, name) for ext, at, size, name in sample.members]))
        self.samples += 1

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._digest.update(data)
        self.bytes_written += len(data)

    def finish(self) -> ShardInfo:
        """End the archive as tarfile does and write the index, both still under temporary names."""
        self._write(b"\0" * (2 * TAR_BLOCK_BYTES))
        self._write(b"\0" * (-self.bytes_written % tarfile.RECORDSIZE))
        self._file.close()
        self._tmp_index_path.write_bytes(index_text(self._index_lines).encode())
        return ShardInfo(
            file=self.tar_path.name,
            index_file=self.index_path.name,
            samples=self.samples,
            bytes=self.bytes_written,
            sha256=self._digest.hexdigest(),
        )

    def close(self) -> ShardInfo:
        """finish() and commit_shard(): the shard is complete under its final names."""
        info = self.finish()
        commit_shard(self.directory, info)
        return info

    def abort(self) -> None:
        """Drop an unfinished shard (does nothing after `close()`)."""
        if not self._file.closed:
            try:
                self._file.close()  # flushes: after a failed write (a full disk) it fails again, and closes
            except OSError:
                pass  # the first failure is the one being raised
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_index_path.unlink(missing_ok=True)


def commit_shard(directory: str | os.PathLike, info: ShardInfo) -> None:
    """fsync a finished shard's temporary files and rename them: index first, the tar last.

    Separate from writing so the converter can run it on a thread of its own while the worker
    processes go on decoding instead of waiting for the disk.
    """
    directory = Path(directory)
    for name in (info.index_file, info.file):
        tmp = directory / (name + ".tmp")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    fsync_dir(directory)


def index_line(members: list[tuple[str, int, int, str]]) -> str:
    """One sample's DALI index line from its (extension, data offset, size, member name) entries."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def index_text(lines: list[str]) -> str:
    """A whole DALI index file, as DALI's wds2idx writes it."""
    return f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)
