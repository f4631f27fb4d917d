"""Encoded batches read ahead in a thread, epoch after epoch: what feeds a DALI pipeline.

DALI's readers take their file list when a pipeline is built, so an exact split that changes every
epoch needed a new pipeline per epoch, and on an H100 each of those switches left the GPU idle for
about a second (docs/PERFORMANCE.md). DALI's own sharding keeps one pipeline but does not keep
epochs exact. So the split's order is handed to one long-lived pipeline through
`fn.external_source`: this stream reads the rank's samples at their offsets (from the .idx files,
via `SampleTable`), batch after batch, running on into the next epoch with no break.

Shards are mapped into memory and each sample handed to the pipeline as a slice of its tar, with no
copy and no system call per sample in this thread (DALI's decoder threads fault the pages in): a
system call releases the GIL, and a training loop that holds it then keeps this thread waiting for
it, at worst for the interpreter's switch interval (5 ms) after every call (docs/PERFORMANCE.md).
Image folders (a file per sample) are read with `os.preadv` into reused buffers instead. Either way
the pipeline takes the bytes without a copy (`no_copy=True`), so a buffer is reused only after the
loader has received the outputs of the batch it held.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.sample_table import UNKNOWN, SampleReader, SampleTable

_PUT_POLL_SECONDS = 0.1  # how often a blocked reader thread checks whether it was stopped
ADVISE_BATCHES_AHEAD = 4  # batches whose reads the kernel is asked to start early (cold page cache)


@dataclass
class EncodedBatch:
    epoch: int
    step: int
    rows: np.ndarray  # table rows, in batch order
    images: list[np.ndarray]  # encoded image bytes: slices of mapped tars, or views into `buffer`
    labels: np.ndarray  # int64
    buffer: np.ndarray | None  # what the images were read into (image folders)
    inputs: tuple = ()  # what the pipeline is handed for this batch, made by `make_inputs`


class BatchStream:
    """Batches of `epoch_rows(e)` for e = first_epoch, first_epoch + 1, ..., from batch `first_step`
    of the first; call it to get the next.

    `epoch_rows(epoch)` gives the table rows of one epoch in reading order (a whole number of
    batches is read from it; the split makes train parts whole batches). `make_inputs(batch)` turns
    a batch just read into what the pipeline is handed (in this thread, ahead of the pipeline, so
    that the thread which runs the pipeline does as little as possible).
    """

    def __init__(
        self,
        table: SampleTable,
        epoch_rows: Callable[[int], np.ndarray],
        first_epoch: int,
        batch_size: int,
        read_ahead: int,
        make_inputs: Callable[[EncodedBatch], tuple],
        first_step: int = 0,
    ):
        self.table, self.batch_size, self._make_inputs = table, batch_size, make_inputs
        self._epoch_rows, self._first_epoch, self._first_step = epoch_rows, first_epoch, first_step
        self._ready: queue.Queue = queue.Queue(maxsize=read_ahead)
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # buffers whose batch DALI has finished
        self.handed: deque[EncodedBatch] = deque()  # given to the pipeline, outputs not yet received
        self._reader = SampleReader(table)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="batch-stream", daemon=True)
        self._thread.start()

    def __call__(self) -> tuple:
        """DALI's source callback: the next batch's inputs."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._ready.put(item)  # the reader has stopped: every later call fails the same way
            raise item
        self.handed.append(item)
        return item.inputs

    def done(self) -> EncodedBatch:
        """The oldest handed batch, whose outputs the caller has just received; its buffer is reused."""
        batch = self.handed.popleft()
        if batch.buffer is not None:
            self._free.put(batch.buffer)
        return batch

    def close(self) -> None:
        """Stop the reader thread and close the files; call after the pipeline is gone."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._ready.get(timeout=_PUT_POLL_SECONDS)  # unblock a waiting put
            except queue.Empty:
                pass
        self._reader.close()
        self.handed.clear()

    def _read_all(self) -> None:
        try:
            epoch, first_step = self._first_epoch, self._first_step
            while not self._stop.is_set():
                rows = self._epoch_rows(epoch)
                starts = range(first_step * self.batch_size, len(rows) - self.batch_size + 1, self.batch_size)
                batches = [rows[i : i + self.batch_size] for i in starts]
                for ahead in batches[:ADVISE_BATCHES_AHEAD]:
                    self._reader.advise_rows(ahead)
                for i, batch_rows in enumerate(batches):
                    if i + ADVISE_BATCHES_AHEAD < len(batches):
                        self._reader.advise_rows(batches[i + ADVISE_BATCHES_AHEAD])
                    if not self._put(self._read_batch(epoch, first_step + i, batch_rows)):
                        return
                epoch, first_step = epoch + 1, 0
        except BaseException as err:  # handed to the consumer, raised where it asks for a batch
            self._put(err)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_PUT_POLL_SECONDS)
                return True
            except queue.Full:
                pass
        return False

    def _buffer(self, nbytes: int) -> np.ndarray:
        try:
            buffer = self._free.get_nowait()
            if len(buffer) >= nbytes:
                return buffer
        except queue.Empty:
            pass
        return np.empty(int(nbytes * 1.25), np.uint8)  # headroom: the next batch is rarely larger

    def _read_batch(self, epoch: int, step: int, rows: np.ndarray) -> EncodedBatch:
        table = self.table
        paths, offsets, sizes = (column[rows].tolist() for column in (table.path_index, table.offset, table.size))
        if table.file_per_sample:
            images, buffer = self._read_files(rows, paths, offsets, sizes)
        else:  # `shard_table` has checked that every sample lies inside its tar
            mapped = self._reader.mapped
            images, buffer = [mapped(p)[o : o + n] for p, o, n in zip(paths, offsets, sizes, strict=True)], None
        labels = table.label[rows]
        for i in np.flatnonzero(labels == UNKNOWN):  # first read of these samples (shards)
            labels[i] = self._reader.label(int(rows[i]))
        batch = EncodedBatch(epoch, step, rows, images, labels, buffer)
        batch.inputs = self._make_inputs(batch)
        return batch

    def _read_files(
        self, rows: np.ndarray, paths: list[int], offsets: list[int], sizes: list[int]
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Read whole files (an image folder's samples) into one reused buffer, views into it."""
        ends = np.cumsum(sizes).tolist()
        buffer = self._buffer(ends[-1])
        view = memoryview(buffer)
        images = []
        for row, path, offset, size, end in zip(rows.tolist(), paths, offsets, sizes, ends, strict=True):
            self._reader.read_into(row, view[end - size : end], path, offset)
            images.append(buffer[end - size : end])
        return images, buffer
