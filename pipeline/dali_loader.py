"""DALI loaders: shards (`dali-gpu`, `dali-cpu`) and image folders (`folder`).

One pipeline serves epoch after epoch: a `BatchStream` hands it the rank's samples in the split's
order and runs on into the next epoch, so an epoch switch is just the next batch. A new pipeline is
built only when the image size changes (progressive resizing) or when the loader is asked for a
batch the stream is not at or a few batches before (the first epoch, a resume, or a pass abandoned
far from its end).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from nvidia.dali.tensors import TensorCPU, TensorListCPU
from PIL import Image

from pipeline.auto_augment import NO_AUTO_AUGMENT
from pipeline.batch_stream import BatchStream, EncodedBatch
from pipeline.dali_pipeline import imagenet_pipeline
from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig, PartLoader
from pipeline.sample_table import SampleTable, file_table, shard_table
from pipeline.shard_set import ShardError, ShardSet
from pipeline.split import EarlierSplit
from pipeline.transforms import random_resized_crops
from shards.image_header import UnreadableHeader, encoded_image_size, ppm_pixels

# A stream this few batches before the one asked for is read up to it (decoded, not used) rather
# than replaced by a new pipeline: a build costs about a second of GPU time on an H100, 16 batches
# less than that. The trainer leaves up to `accumulate - 1` batches when they do not fill an
# optimizer step.
DRAIN_AT_MOST = 16


@dataclass
class _Run:
    """A pipeline at one image size, fed by its stream, and the position of its next batch."""

    image_size: int
    stream: BatchStream
    pipe: object
    batches: DALIGenericIterator
    epoch: int
    step: int

    def close(self) -> None:
        del self.batches
        shut_down(self.pipe)  # the pipeline goes first: it may still hold the stream's buffers
        self.stream.close()


class DaliLoader(PartLoader):
    """The DALI graph of `pipeline.dali_pipeline` over a `SampleTable`, one pipeline for many epochs."""

    def __init__(
        self,
        table: SampleTable,
        split: str,
        cfg: LoaderConfig,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        super().__init__(table.sizes, split, cfg, rank, world_size, device)
        self.table = table
        self.decode_on_gpu = device.type == "cuda" and cfg.backend != "dali-cpu"
        self._run: _Run | None = None
        self.pipelines_built = 0  # one per image size when epochs are read in order

    def set_epoch(self, epoch: int, start_step: int = 0, earlier: EarlierSplit | None = None) -> None:
        super().set_epoch(epoch, start_step, earlier)
        if self.rest_of_epoch is not None:  # a running stream has the unbroken epoch's rows
            self._close_run()

    def _image_sizes(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """Heights and widths of a batch's images: from the table, or on first read from their headers.

        A stored PPM must hold exactly the pixels its header promises: checked when first read (the
        tars do not change while they are read: `SampleReader` checks their length).
        """
        table, rows = self.table, batch.rows
        heights, widths = table.height[rows], table.width[rows]
        for i in np.flatnonzero(heights == 0):  # first read of these samples in this run
            image = batch.images[i]
            try:
                if table.raw_pixels:
                    heights[i], widths[i] = ppm_pixels(image).shape[:2]
                else:
                    heights[i], widths[i] = encoded_image_size(image)
            except UnreadableHeader as err:
                raise SampleDecodeError(f"{table.describe(int(rows[i]))}: cannot be decoded ({err})") from None
        table.height[rows], table.width[rows] = heights, widths
        return heights, widths

    def _train_draws(self, batch: EncodedBatch, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Crop windows and flips of a train batch (and the auto-augmentation's draws), a function of
        (seed, epoch, rank, step) alone.

        Drawn here rather than by DALI's random operators, whose state lives in the pipeline: this
        way resuming at any epoch repeats the crops of a run that never stopped, and dali-gpu and
        dali-cpu crop alike.
        """
        rng = np.random.default_rng([self.cfg.seed, batch.epoch, self.rank, batch.step])
        anchors, shapes = random_resized_crops(heights, widths, rng)
        flips = rng.integers(0, 2, len(batch.images), dtype=np.int32)
        if not self.cfg.augment.enabled:
            return anchors, shapes, flips
        return anchors, shapes, flips, *self.cfg.augment.draw(len(batch.images), rng)

    def _pipeline_inputs(self, batch: EncodedBatch) -> tuple[TensorListCPU, ...]:
        """What the pipeline is handed for a batch: DALI tensor lists over the batch's own memory.

        Made in the stream's reader thread. Handed numpy arrays instead, DALI's source callback
        wraps each sample itself, in the thread that runs the pipeline (the training loop's): 2.2 ms
        per batch of 256 there, against 0.3 ms here and 0.6 ms left there (docs/PERFORMANCE.md).
        """
        # Val needs no sizes, but reading them checks each header on first read: DALI would crash on
        # some damaged ones (shards/image_header.py).
        sizes = self._image_sizes(batch)
        if self.table.raw_pixels:  # the pixels are the PPM's last height x width x 3 bytes
            pixels = [
                image[len(image) - h * w * 3 :].reshape(h, w, 3)
                for image, h, w in zip(batch.images, *(s.tolist() for s in sizes), strict=True)
            ]
            images = TensorListCPU([TensorCPU(p, "HWC") for p in pixels], layout="HWC", contiguous=False)
        else:
            images = TensorListCPU([TensorCPU(image) for image in batch.images], contiguous=False)
        per_sample = (batch.labels, *self._train_draws(batch, *sizes)) if self.train else (batch.labels,)
        return images, *(TensorListCPU(values) for values in per_sample)

    def _start(self) -> _Run:
        self.pipelines_built += 1
        stream = BatchStream(
            self.table,
            self.epoch_rows,
            self.epoch,
            self.batch_size,
            read_ahead=max(2, self.cfg.prefetch),
            make_inputs=self._pipeline_inputs,
            first_step=self.start_step,
        )
        pipe = imagenet_pipeline(
            source=stream,
            train=self.train,
            image_size=self.image_size,
            val_resize=self.val_resize_for(self.image_size),
            decode_on_gpu=self.decode_on_gpu,
            raw_pixels=self.table.raw_pixels,
            auto_augment=self.cfg.augment if self.train else NO_AUTO_AUGMENT,
            interpolation=self.cfg.interpolation,
            hw_decoder_load=self.cfg.hw_decoder_load,
            # DALI has no bfloat16: half-width float16 out (normalized values fit it easily), cast after.
            output_float16=self.dtype in (torch.float16, torch.bfloat16),
            batch_size=self.batch_size,
            num_threads=self.cfg.workers,
            device_id=self.device.index if self.decode_on_gpu else None,
            prefetch_queue_depth=self.cfg.prefetch,
        )
        try:
            pipe.build()
            # Making the iterator runs the pipeline: decode errors can surface here.
            batches = DALIGenericIterator([pipe], ["images", "labels"], size=-1)
        except Exception as err:
            named = _name_undecodable(err, stream)
            shut_down(pipe)
            stream.close()
            if named is None:
                raise
            raise named from err
        return _Run(self.image_size, stream, pipe, batches, self.epoch, self.start_step)

    def _ready_run(self) -> _Run:
        """A run whose next batch is the wanted pass's first (`start_step`): kept, drained to it, or new."""
        run = self._run
        if run is not None and run.image_size == self.image_size:
            # Train wants its epoch; val reads the same samples every pass, so the next one will do.
            wanted_epoch = self.epoch if self.train else run.epoch + (run.step > self.start_step)
            ahead = (wanted_epoch - run.epoch) * self.steps_per_epoch + self.start_step - run.step
            if wanted_epoch - run.epoch <= 1 and 0 <= ahead <= DRAIN_AT_MOST:
                for _ in range(ahead):
                    self._next_batch(run)
                return run
        self._close_run()
        self._run = self._start()
        return self._run

    def _next_batch(self, run: _Run) -> tuple[dict, EncodedBatch]:
        try:
            out = next(run.batches)[0]
        except Exception as err:
            named = _name_undecodable(err, run.stream)
            self._close_run()
            if named is None:
                raise
            raise named from err
        batch = run.stream.done()
        if (batch.epoch, batch.step) != (run.epoch, run.step):
            raise RuntimeError(f"DALI returned epoch {batch.epoch} step {batch.step}, expected {run.epoch} {run.step}")
        run.step += 1
        if run.step == self.steps_per_epoch:
            run.epoch, run.step = run.epoch + 1, 0
        return out, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.start_step == self.steps_per_epoch:  # resumed at the end of an epoch: nothing to read
            return
        run = self._ready_run()
        for step in range(self.start_step, self.steps_per_epoch):
            out, _ = self._next_batch(run)
            # DALI gives NHWC; the permuted view is NCHW in channels_last memory format, no copy.
            images = out["images"].permute(0, 3, 1, 2)
            images = images.to(self.device, dtype=self.dtype, non_blocking=True)
            labels = out["labels"].view(-1).to(self.device, non_blocking=True)
            yield images, self.padding_labels(labels, step)

    def _close_run(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None

    def close(self) -> None:
        self._close_run()  # a later epoch starts a new run: a closed loader can be read again
        super().close()


class DaliShardLoader(DaliLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        super().__init__(shard_table(shard_set), split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes


class DaliFolderLoader(DaliLoader):
    def __init__(
        self,
        files: list[str],
        labels: list[int],
        split: str,
        cfg: LoaderConfig,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        super().__init__(file_table(files, labels), split, cfg, rank, world_size, device)
        self.num_classes = max(labels) + 1


def shut_down(pipe) -> None:
    """Stop a DALI pipeline and free it now, in this process.

    Dropping the last reference is not enough: a pipeline in a reference cycle (an exception's
    traceback holds one) waits for the cycle collector, which may run first in a forked child, such
    as a DataLoader worker of the `torch` backend; finalized there, where its threads do not exist,
    the pipeline hangs the child (seen in this project's tests). DALI has no public call for this;
    `_shutdown` is what its own exit handler calls, and a second call does nothing.
    """
    pipe._shutdown()


def _name_undecodable(err: Exception, stream: BatchStream) -> SampleDecodeError | None:
    """DALI's decode errors do not say which sample; find it with PIL among the batches in flight."""
    if isinstance(err, ShardError) or "decoder" not in str(err):
        return None  # not a decode error (the stream's own errors name their file already)
    for batch in stream.handed:
        for row, image in zip(batch.rows.tolist(), batch.images, strict=True):
            if _pil_error(image.tobytes()):
                return SampleDecodeError(f"{stream.table.describe(row)}: cannot be decoded (epoch {batch.epoch})")
    return None


def _pil_error(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return False
    except Exception:  # PIL raises many types for bad data
        return True
