"""Where every sample of a split lies on disk: one numpy row per sample, built once per loader.

Rows are numbered in the split's order (shard by shard, as in manifest.json), which is the order
`pipeline.split` counts in, so a rank's part of an epoch becomes an array of row numbers. Numpy
columns keep this small for ImageNet (1.28M rows, about 40 MB) and fast to gather per batch.
"""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pipeline.shard_set import ShardError, ShardSet, index_members, sample_key
from pipeline.split import RankPart, shuffled_positions

UNKNOWN = -1  # a label not read yet; a size not read yet is 0


@dataclass(frozen=True)
class SampleTable:
    """Where each sample's image and label lie, one row per sample.

    `label` (for shards), `height` and `width` start unknown and are filled in by the DALI reader
    thread the first time it reads a sample: they never change, and knowing them saves a read and a
    header parse per sample in every later epoch.
    """

    paths: list[str]  # the files samples lie in: tars, or one image file per sample
    path_index: np.ndarray  # int32 per row: which of `paths`
    offset: np.ndarray  # int64 per row: first byte of the encoded image
    size: np.ndarray  # int64 per row: bytes of the encoded image
    label: np.ndarray  # int64 per row: known up front for image folders, UNKNOWN until read for shards
    label_offset: np.ndarray | None  # int64 per row: the label's ASCII digits in the tar (shards)
    label_size: np.ndarray | None
    first_row: np.ndarray  # int64 per shard (or file): row number of its first sample
    index_lines: list[list[str]] | None  # per shard, its .idx lines: sample keys for messages
    height: np.ndarray  # int32 per row, 0 until read from the image's header
    width: np.ndarray
    raw_pixels: bool = False  # the images are decoded RGB pixels (binary PPM), not JPEG

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def file_per_sample(self) -> bool:
        """An image folder: each sample is a whole file (shards hold many samples per file)."""
        return self.index_lines is None

    def sample_starts(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Where each sample's first byte (image or label) lies in its file."""
        if self.label_offset is None:
            return self.offset[rows]
        return np.minimum(self.offset[rows], self.label_offset[rows])

    def sample_ends(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Where each sample's last byte (image or label) ends in its file."""
        ends = self.offset[rows] + self.size[rows]
        if self.label_offset is None:
            return ends
        return np.maximum(ends, self.label_offset[rows] + self.label_size[rows])

    @property
    def sizes(self) -> list[int]:
        """Samples per shard (per file for a folder), in manifest order: what `pipeline.split` splits."""
        return np.diff(np.append(self.first_row, len(self))).tolist()

    def rows(self, part: RankPart) -> np.ndarray:
        """Row numbers of a rank's part, in the part's order (its picks of them, if it has any)."""
        if not part.pieces:
            return np.zeros(0, np.int64)
        rows = np.concatenate(
            [np.arange(p.start, p.stop, dtype=np.int64) + self.first_row[p.shard] for p in part.pieces]
        )
        return rows if part.picks is None else rows[np.asarray(part.picks, dtype=np.int64)]

    def reading_order(self, part: RankPart, train: bool, seed: int, epoch: int, shuffle_key: int) -> np.ndarray:
        """Row numbers of a rank's part in the order every shard backend reads them: for train
        shuffled per sample (`split.shuffled_positions`), seeded by (seed, epoch, shuffle_key)."""
        rows = self.rows(part)
        if train:
            rows = rows[shuffled_positions(part, seed, epoch, shuffle_key)]
        return rows

    def describe(self, row: int) -> str:
        """`<tar>: sample <key>`, or the image file's path: how error messages name a sample."""
        if self.index_lines is None:
            return self.paths[row]
        return f"{self.paths[self._shard_of(row)]}: sample {self.key(row)}"

    def key(self, row: int) -> str:
        """The sample's key in its shard (its source file's name less the extension, as the converter
        makes keys), or for an image folder the file's name less the extension."""
        if self.index_lines is None:
            return os.path.splitext(os.path.basename(self.paths[row]))[0]
        shard = self._shard_of(row)
        return sample_key(self.index_lines[shard][row - int(self.first_row[shard])])

    def _shard_of(self, row: int) -> int:
        return int(np.searchsorted(self.first_row, row, side="right")) - 1


def shard_table(shard_set: ShardSet) -> SampleTable:
    """The rows of a shard split, from the index lines `open_shard_set` has read and checked."""
    paths, path_index, offset, size, label_offset, label_size, first_row = [], [], [], [], [], [], []
    image_ext = shard_set.image_ext
    for shard in range(len(shard_set.shards)):
        first_row.append(len(offset))
        paths.append(str(shard_set.tar_path(shard)))
        index_path = shard_set.directory / shard_set.shards[shard].index_file
        for line in shard_set.index_lines(shard):
            members = index_members(line, index_path, image_ext)
            path_index.append(shard)
            offset.append(members[image_ext][0])
            size.append(members[image_ext][1])
            label_offset.append(members["cls"][0])
            label_size.append(members["cls"][1])
    table = SampleTable(
        paths=paths,
        path_index=np.array(path_index, np.int32),
        offset=np.array(offset, np.int64),
        size=np.array(size, np.int64),
        label=np.full(len(offset), UNKNOWN, np.int64),
        label_offset=np.array(label_offset, np.int64),
        label_size=np.array(label_size, np.int64),
        first_row=np.array(first_row, np.int64),
        index_lines=shard_set.indexes,
        height=np.zeros(len(offset), np.int32),
        width=np.zeros(len(offset), np.int32),
        raw_pixels=image_ext == "ppm",
    )
    # Every sample must lie inside its tar: the DALI loaders read the tars mapped into memory, where
    # a range past the end would come out short (or, past the last page, kill the process).
    tar_bytes = np.array([s.bytes for s in shard_set.shards], np.int64)[table.path_index]
    for row in np.flatnonzero(table.sample_ends() > tar_bytes)[:1].tolist():
        shard = int(table.path_index[row])
        info, line = shard_set.shards[shard], table.index_lines[shard][row - int(table.first_row[shard])]
        raise ShardError(
            f"{shard_set.directory / info.index_file}: does not match {info.file}"
            f" (sample {sample_key(line)} ends past the tar's end)"
        )
    return table


def file_table(files: list[str], labels: list[int]) -> SampleTable:
    """The rows of an image folder: each file is one sample, read whole."""
    try:
        sizes = [os.stat(f).st_size for f in files]
    except OSError as err:
        raise FileNotFoundError(f"{err.filename}: cannot be read ({err.strerror})") from err
    rows = np.arange(len(files), dtype=np.int64)
    return SampleTable(
        paths=list(files),
        path_index=rows.astype(np.int32),
        offset=np.zeros(len(files), np.int64),
        size=np.array(sizes, np.int64),
        label=np.array(labels, np.int64),
        label_offset=None,
        label_size=None,
        first_row=rows,
        index_lines=None,
        height=np.zeros(len(files), np.int32),
        width=np.zeros(len(files), np.int32),
    )


class SampleReader:
    """Reads a table's samples from their files, for every backend: exact reads, mapped shards,
    labels, and errors that name the sample.

    Tars are mapped into memory once, whole (DALI's own readers do the same). An image folder's files
    are read with system calls; their descriptors stay open for reuse, the least recently used
    closed beyond `max_open` (a folder has a file per sample, which cannot all stay open). Open it
    after a fork (DataLoader workers) or in one thread: it is not shared between processes or
    threads.
    """

    def __init__(self, table: SampleTable, max_open: int = 512):
        self.table, self.max_open = table, max_open
        self._open: OrderedDict[int, int] = OrderedDict()  # path index -> descriptor
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}  # path index -> mapping, its bytes

    def fd(self, path: int) -> int:
        """The open descriptor of `table.paths[path]`."""
        fd = self._open.get(path)
        if fd is not None:
            self._open.move_to_end(path)
            return fd
        if len(self._open) >= self.max_open:
            os.close(self._open.popitem(last=False)[1])
        fd = self._open[path] = os.open(self.table.paths[path], os.O_RDONLY)
        return fd

    def read_into(self, row: int, target: memoryview, path: int, offset: int) -> None:
        """Fill `target` with the bytes at `offset` of file `path` (sample `row`'s image), exactly."""
        try:
            got = os.preadv(self.fd(path), [target], offset)
        except OSError as err:
            raise ShardError(f"{self.table.describe(row)}: cannot be read ({err})") from err
        if got != len(target):
            raise ShardError(f"{self.table.describe(row)}: {len(target)} bytes expected at offset {offset}, got {got}")

    def mapped(self, path: int) -> np.ndarray:
        """The bytes of file `path` (a tar), mapped read-only into memory until `close`.

        Slices of it reach DALI with no copy and no system call per sample: the decoders' own
        threads fault the pages in. The DALI reader thread reads this way because each system call
        releases the GIL, which the training loop then holds until the reader can take it back
        (docs/pipeline.md). DALI's own readers map files the same way.
        """
        return self._mapping(path)[1]

    def advise(self, path: int, offset: int, size: int) -> None:
        """Ask the kernel to start reading these bytes of file `path` now (a hint: errors are left
        to the read). For a tar through its mapping: `madvise` keeps the GIL (it only starts the
        reads), so the thread does not have to win it back as after a system call.
        """
        try:
            if not self.table.file_per_sample and hasattr(mmap, "MADV_WILLNEED"):
                start = offset - offset % mmap.PAGESIZE
                self._mapping(path)[0].madvise(mmap.MADV_WILLNEED, start, offset + size - start)
            elif hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd(path), offset, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def advise_rows(self, rows: np.ndarray) -> None:
        """Ask the kernel to start reading these samples (image and label bytes) now.

        Samples are read in random order, so the kernel's own readahead does not help a cold page
        cache; with this the reads overlap instead of waiting one after another where the bytes are
        used.
        """
        table = self.table
        places = (table.path_index[rows].tolist(), table.sample_starts(rows).tolist(), table.sample_ends(rows).tolist())
        for path, start, end in zip(*places, strict=True):
            self.advise(path, start, end - start)

    def _mapping(self, path: int) -> tuple[mmap.mmap, np.ndarray]:
        mapped = self._maps.get(path)
        if mapped is None:
            try:
                fd = os.open(self.table.paths[path], os.O_RDONLY)
                try:  # the mapping outlives its descriptor: none is kept open
                    mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                finally:
                    os.close(fd)
            except (OSError, ValueError) as err:  # ValueError: an empty file
                raise ShardError(f"{self.table.paths[path]}: cannot be mapped into memory ({err})") from err
            self._check_length(path, len(mapping))
            mapped = self._maps[path] = (mapping, np.frombuffer(mapping, np.uint8))
        return mapped

    def _check_length(self, path: int, length: int) -> None:
        """A tar shorter than its samples' ranges (cut since the loader opened it) is named here, with
        its first sample past the end, rather than read short."""
        table = self.table
        rows = slice(
            int(table.first_row[path]), int(table.first_row[path + 1]) if path + 1 < len(table.paths) else None
        )
        past = np.flatnonzero(table.sample_ends(rows) > length)
        if len(past):
            row = rows.start + int(past[0])
            raise ShardError(
                f"{table.describe(row)}: {int(table.size[row])} bytes expected at offset {int(table.offset[row])},"
                f" the file has {length} bytes (changed since the loader opened it?)"
            )

    def image(self, row: int) -> bytes:
        """Sample `row`'s encoded image (a copy)."""
        path, offset, size = (
            int(column[row]) for column in (self.table.path_index, self.table.offset, self.table.size)
        )
        if not self.table.file_per_sample:
            return self.mapped(path)[offset : offset + size].tobytes()
        data = bytearray(size)
        self.read_into(row, memoryview(data), path, offset)
        return bytes(data)

    def label(self, row: int) -> int:
        """Sample `row`'s class: from the table when known, else its ASCII digits in the tar (then kept)."""
        table = self.table
        if table.label[row] != UNKNOWN:
            return int(table.label[row])
        start = int(table.label_offset[row])
        raw = self.mapped(int(table.path_index[row]))[start : start + int(table.label_size[row])].tobytes()
        try:
            table.label[row] = int(raw)
        except ValueError:
            raise ShardError(f"{table.describe(row)}: label {bytes(raw[:16])!r} is not a class number") from None
        return int(table.label[row])

    def close(self) -> None:
        """Close the descriptors and drop the mappings (unmapped once no slice of them is left)."""
        while self._open:
            os.close(self._open.popitem()[1])
        self._maps.clear()
