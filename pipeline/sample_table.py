"""Where every sample of a split lies on disk: one numpy row per sample, built once per loader.

Rows are numbered in the split's order (shard by shard, as in manifest.json), which is the order
`pipeline.split` counts in, so a rank's part of an epoch becomes an array of row numbers. Numpy
columns keep this small for ImageNet (1.28M rows, about 40 MB) and fast to gather per batch.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pipeline.shard_set import ShardError, ShardSet, index_members, sample_key
from pipeline.split import RankPart

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

    def __len__(self) -> int:
        return len(self.offset)

    @property
    def sizes(self) -> list[int]:
        """Samples per shard (per file for a folder), in manifest order: what `pipeline.split` splits."""
        return np.diff(np.append(self.first_row, len(self))).tolist()

    def rows(self, part: RankPart) -> np.ndarray:
        """Row numbers of a rank's part, in the part's order."""
        if not part.pieces:
            return np.zeros(0, np.int64)
        return np.concatenate(
            [np.arange(p.start, p.stop, dtype=np.int64) + self.first_row[p.shard] for p in part.pieces]
        )

    def describe(self, row: int) -> str:
        """`<tar>: sample <key>`, or the image file's path: how error messages name a sample."""
        if self.index_lines is None:
            return self.paths[row]
        shard = int(np.searchsorted(self.first_row, row, side="right")) - 1
        return f"{self.paths[shard]}: sample {sample_key(self.index_lines[shard][row - int(self.first_row[shard])])}"


def shard_table(shard_set: ShardSet) -> SampleTable:
    """The rows of a shard split, from the index lines `open_shard_set` has read and checked."""
    paths, path_index, offset, size, label_offset, label_size, first_row = [], [], [], [], [], [], []
    for shard in range(len(shard_set.shards)):
        first_row.append(len(offset))
        paths.append(str(shard_set.tar_path(shard)))
        index_path = shard_set.directory / shard_set.shards[shard].index_file
        for line in shard_set.index_lines(shard):
            members = index_members(line, index_path)
            path_index.append(shard)
            offset.append(members["jpg"][0])
            size.append(members["jpg"][1])
            label_offset.append(members["cls"][0])
            label_size.append(members["cls"][1])
    return SampleTable(
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
    )


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
    """Reads a table's samples from their files, for every backend: exact reads, labels, and errors
    that name the sample.

    Descriptors stay open for reuse, the least recently used closed beyond `max_open`: a rank reads
    its shards in random order, so reopening per sample would cost a syscall pair per image, and an
    image folder has a file per sample, which cannot all stay open. Open it after a fork (DataLoader
    workers) or in one thread: it is not shared between processes or threads.
    """

    def __init__(self, table: SampleTable, max_open: int = 512):
        self.table, self.max_open = table, max_open
        self._open: OrderedDict[int, int] = OrderedDict()  # path index -> descriptor

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

    def image(self, row: int) -> bytes:
        """Sample `row`'s encoded image."""
        data = bytearray(int(self.table.size[row]))
        self.read_into(row, memoryview(data), int(self.table.path_index[row]), int(self.table.offset[row]))
        return bytes(data)

    def label(self, row: int) -> int:
        """Sample `row`'s class: from the table when known, else its ASCII digits in the tar (then kept)."""
        table = self.table
        if table.label[row] != UNKNOWN:
            return int(table.label[row])
        raw = bytearray(int(table.label_size[row]))
        self.read_into(row, memoryview(raw), int(table.path_index[row]), int(table.label_offset[row]))
        try:
            table.label[row] = int(raw)
        except ValueError:
            raise ShardError(f"{table.describe(row)}: label {bytes(raw[:16])!r} is not a class number") from None
        return int(table.label[row])

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])
