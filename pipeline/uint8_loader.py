"""The `torch-uint8` backend: whole batches cropped and resized as uint8 in DataLoader worker
processes, copied to the GPU as uint8 and normalized there.

Made for train splits stored as raw pixels (`tools.make_shards --train-raw-pixels`): a worker reads
a PPM's pixels straight from the mapped tar, cuts the crop and resizes it with torchvision's uint8
kernels, so per batch the GPU sees one copy (on a side stream, overlapping the step) and a few
elementwise kernels, nothing per image. JPEG samples are decoded with PIL first, which is slow
beside DALI: on JPEG shards prefer `dali-gpu`. This is the design of timm's and FFCV's fast
loaders (uint8 batches, normalization on the GPU) over this project's shards and split.

Train crop windows and flips (and TrivialAugment's operations) are drawn exactly as the DALI
backends draw them, from (seed, epoch, rank, step) with `transforms.random_resized_crops`, so the
batches match `dali-cpu`'s up to the resize's rounding (tested). The workers persist across
epochs: each batch is requested as (epoch, image size, step, slot), and written into that slot of a
`BatchSlots` ring.
"""

from __future__ import annotations

import io
import itertools
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig, PartLoader
from pipeline.sample_table import SampleReader, SampleTable, shard_table
from pipeline.shard_set import ShardSet
from pipeline.split import EarlierSplit, rank_part, shuffle_key
from pipeline.torch_loader import outlive_job_signals, stop_workers_on_error
from pipeline.transforms import PIXEL_MEAN, PIXEL_STD, random_resized_crops, val_resize_size
from shards.image_check import rgb_image
from shards.image_header import UnreadableHeader, encoded_image_size, ppm_pixels


class BatchSlots:
    """A ring of batch buffers in shared memory: workers write uint8 batches into it, the main process
    copies them to the device from it, and on a GPU the whole ring is pinned once.

    Hand-written because a DataLoader hands each batch over in a new shared-memory segment, which
    the worker must fault in and the main process must map and, on a GPU, copy into pinned memory in
    its one pin-memory thread: about 6-8 ms of that thread per batch of 256 at 224 px on the CPU
    machine. On an H100's host torch-uint8 alone made 70-80 batches/s with 10 of its 16 worker cores
    idle, which that serial stage would explain (docs/PERFORMANCE.md, fourteenth session). Here only
    the slot's number and the labels cross between processes, and the GPU copies from the ring.
    The ring holds workers x prefetch + 2 batches: 1.2 GiB for 16 workers, prefetch 2, 256 x 224 px.

    A slot is reused only after the device has finished copying out of it: `claim` waits for that,
    and runs in the main process when the DataLoader hands a worker its next key.
    """

    def __init__(self, count: int, batch_size: int, image_size: int, device: torch.device):
        self.count, self.image_size, self.device = count, image_size, device
        self.buffer = torch.empty((count, batch_size * image_size * image_size * 3), dtype=torch.uint8)
        try:
            self.buffer.share_memory_()
        except RuntimeError as err:  # e.g. a container's small /dev/shm
            raise RuntimeError(
                f"torch-uint8: cannot place its {count} batch buffers ({self.buffer.numel() / 2**30:.2f} GiB)"
                f" in shared memory ({err}); lower data.workers or data.prefetch, or enlarge /dev/shm"
            ) from err
        self._copied: list[torch.cuda.Event | None] = [None] * count  # each slot's last copy to the device
        self._claimed = 0
        self._unpin = None

    def pin(self) -> None:
        """Page-lock the ring for asynchronous copies to the GPU (once). Called after the workers are
        started: the CUDA driver may keep page-locked memory out of processes forked later."""
        if self._unpin is not None:
            return
        pointer, size = self.buffer.data_ptr(), self.buffer.numel()
        error = int(torch.cuda.cudart().cudaHostRegister(pointer, size, 0))
        if error:
            raise RuntimeError(
                f"torch-uint8: page-locking its {size / 2**30:.2f} GiB of batch buffers failed"
                f" (cudaHostRegister error {error}); lower data.workers or data.prefetch"
            )
        self._unpin = weakref.finalize(self, _unpin, self.buffer, self.device)  # before the ring is freed

    def claim(self) -> int:
        """The next slot in turn, once the device has finished copying the batch it held before."""
        slot = self._claimed % self.count
        self._claimed += 1
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        return slot

    def batch(self, slot: int, length: int, size: int) -> torch.Tensor:
        return slot_batch(self.buffer, slot, length, size)

    def copied_on(self, slot: int, stream: torch.cuda.Stream) -> None:
        """Mark slot `slot` in use until the work queued on `stream` so far is done."""
        event = torch.cuda.Event()
        event.record(stream)
        self._copied[slot] = event

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()


def slot_batch(buffer: torch.Tensor, slot: int, length: int, size: int) -> torch.Tensor:
    """Slot `slot` of a `BatchSlots` buffer seen as `length` uint8 images of `size` x `size` x 3."""
    return buffer[slot, : length * size * size * 3].view(length, size, size, 3)


def _unpin(buffer: torch.Tensor, device: torch.device) -> None:
    torch.cuda.synchronize(device)  # no copy may still read the ring
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class Uint8Batches(Dataset):
    """Batch `(epoch, image_size, step, slot)` of one rank's part, written into `slot` of the ring
    as uint8 N x S x S x 3; returns (slot, int64 labels).

    Runs in worker processes: everything it needs to find a batch's rows is a pure function of the
    split's parameters, so persistent workers serve epoch after epoch.
    """

    def __init__(
        self,
        table: SampleTable,
        train: bool,
        cfg: LoaderConfig,
        rank: int,
        world_size: int,
        batch_size: int,
        ring: torch.Tensor,
        rest_of_epoch: tuple[int, np.ndarray] | None = None,
    ):
        self.table, self.train, self.cfg, self.ring = table, train, cfg, ring  # BatchSlots.buffer
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.rest_of_epoch = rest_of_epoch  # (epoch, rows): the loader's, for a resumed run's first epoch
        self._reader: SampleReader | None = None  # opened in each worker, on first use
        self._rows_epoch: int | None = None
        self._rows = np.empty(0, np.int64)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Table rows of the rank's part of `epoch`, in the DALI backends' reading order (kept per epoch)."""
        if self.rest_of_epoch is not None and self.rest_of_epoch[0] == epoch:
            return self.rest_of_epoch[1]
        if epoch != self._rows_epoch:
            repeats = self.cfg.aug_repeats
            part = rank_part(
                self.table.sizes, self.train, self.rank, self.world_size, self.batch_size, epoch, self.cfg.seed, repeats
            )
            key = shuffle_key(self.rank, repeats)
            self._rows = self.table.reading_order(part, self.train, self.cfg.seed, epoch, key)
            self._rows_epoch = epoch
        return self._rows

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[int, np.ndarray]:
        epoch, size, step, slot = key
        if self._reader is None:
            self._reader = SampleReader(self.table)
        rows = self.epoch_rows(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        self._reader.advise_rows(rows)  # from a cold page cache the batch's reads then overlap
        rows = rows.tolist()
        stored = [self._stored(row) for row in rows]
        labels = np.array([self._reader.label(row) for row in rows], dtype=np.int64)
        images = slot_batch(self.ring, slot, len(rows), size)
        interpolation = InterpolationMode(self.cfg.interpolation)
        if self.train:
            heights, widths = np.array([self._height_width(row, s) for row, s in zip(rows, stored, strict=True)]).T
            rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, step])
            anchors, shapes = random_resized_crops(heights, widths, rng)
            flips = rng.integers(0, 2, len(rows), dtype=np.int32)
            augment = self.cfg.augment
            operations = augment.draw(len(rows), rng) if augment.enabled else None
            for i, (row, s) in enumerate(zip(rows, stored, strict=True)):
                (x, y), (w, h) = anchors[i].astype(int), shapes[i].astype(int)
                crop = _channels_first(self._pixels(row, s)[y : y + h, x : x + w])
                resized = F.resize(crop, [size, size], interpolation=interpolation, antialias=True)
                if augment.enabled:
                    resized = augment.apply(resized, *(draws[i] for draws in operations))
                resized = resized.permute(1, 2, 0)
                images[i] = resized.flip(1) if flips[i] else resized
        else:
            resize = val_resize_size(size, self.cfg.crop_pct)
            for i, (row, s) in enumerate(zip(rows, stored, strict=True)):
                image = F.resize(
                    _channels_first(self._pixels(row, s)), [resize], interpolation=interpolation, antialias=True
                )
                images[i] = F.center_crop(image, [size, size]).permute(1, 2, 0)
        return slot, labels

    def close(self) -> None:
        """Unmap the tars this process has read from (a worker's are unmapped as it exits)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _stored(self, row: int) -> np.ndarray:
        """Sample `row` as stored, read from the mapped tar with no copy: for raw pixels the H x W x 3
        pixels (their header checked), else the encoded image."""
        table = self.table
        offset, size = int(table.offset[row]), int(table.size[row])
        data = self._reader.mapped(int(table.path_index[row]))[offset : offset + size]
        if not table.raw_pixels:
            return data
        try:
            return ppm_pixels(data)
        except UnreadableHeader as err:
            raise SampleDecodeError(f"{table.describe(row)}: cannot be decoded ({err})") from None

    def _height_width(self, row: int, stored: np.ndarray) -> tuple[int, int]:
        if self.table.raw_pixels:
            return stored.shape[:2]
        try:
            return encoded_image_size(stored)
        except UnreadableHeader as err:
            raise SampleDecodeError(f"{self.table.describe(row)}: cannot be decoded ({err})") from None

    def _pixels(self, row: int, stored: np.ndarray) -> np.ndarray:
        """The image's H x W x 3 pixels: as stored, or decoded by PIL."""
        if self.table.raw_pixels:
            return stored
        try:
            return np.asarray(rgb_image(Image.open(io.BytesIO(stored))))
        except Exception as err:  # PIL raises many types for bad data
            raise SampleDecodeError(f"{self.table.describe(row)}: cannot be decoded ({err})") from err


def _channels_first(pixels: np.ndarray) -> torch.Tensor:
    """A contiguous copy of H x W x 3 pixels seen as 3 x H x W: torchvision's fast uint8 resize path
    (channels last). From a strided view of the tar it ran 2.5x slower on the CPU machine, and the
    mapped tar is read-only."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


def _as_returned(batch):
    """The DataLoader's collate function: a worker's (slot, labels) as it is, with no tensor to share."""
    return batch


class EpochSteps(Sampler):
    """The keys (epoch, image size, step, slot) of the pass the loader last set (from its first step),
    then of the whole passes after it, on and on (train: the next epochs; val, the same in every
    epoch: the same pass again):
    the workers go on into the next pass while this one's last batches are used, so a pass starts
    without waiting for one worker to make its first batch (about 0.15 s beside ResNet-18 on an H100,
    7% of the benchmark's 2-s epochs).

    Iterated in the main process, one key as a worker is handed its next batch, so a slot is claimed
    then. Holds values and the ring, not the loader: a loader that is dropped (after an error, say)
    is then freed at once, and its DataLoader with it, which stops the workers.
    """

    def __init__(self, slots: BatchSlots, train: bool):
        self.slots, self.epochs_apart = slots, int(train)  # epochs from one pass to the next
        self.epoch, self.image_size, self.first_step, self.steps = 0, 0, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        epoch, size, first_step, steps = self.epoch, self.image_size, self.first_step, self.steps
        while True:
            for step in range(first_step, steps):
                yield epoch, size, step, self.slots.claim()
            epoch, first_step = epoch + self.epochs_apart, 0


class Uint8Loader(PartLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        self.table = shard_table(shard_set)
        super().__init__(self.table.sizes, split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(PIXEL_MEAN, device=device).view(shape)
        self._inverse_std = torch.tensor([1 / s for s in PIXEL_STD], device=device).view(shape)
        self._slots: BatchSlots | None = None
        self._stream = self._streamed_next = None  # the workers' batches, and the pass they go on to
        self._start_workers(self.image_size)

    def _start_workers(self, image_size: int) -> None:
        """A ring for batches of `image_size` and the persistent workers that fill it (replacing any)."""
        self.close()
        # every batch a worker may hold or the DataLoader may have returned, and the one being copied
        count = self.cfg.workers * self.cfg.prefetch + 2
        self._slots = BatchSlots(count, self.batch_size, image_size, self.device)
        self._pass = EpochSteps(self._slots, self.train)
        dataset = Uint8Batches(
            self.table,
            self.train,
            self.cfg,
            self.rank,
            self.world_size,
            self.batch_size,
            self._slots.buffer,
            self.rest_of_epoch,
        )
        self._batches = DataLoader(
            dataset,
            batch_size=None,
            sampler=self._pass,
            num_workers=self.cfg.workers,
            collate_fn=_as_returned,
            prefetch_factor=self.cfg.prefetch,
            persistent_workers=True,
            worker_init_fn=outlive_job_signals,
            # Its own generator for the workers' base seed (crops depend on seeds of their own): a draw
            # from torch's global one would shift the trainer's MixUp draws in a resumed run.
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.rank),
        )

    def set_epoch(self, epoch: int, start_step: int = 0, earlier: EarlierSplit | None = None) -> None:
        super().set_epoch(epoch, start_step, earlier)
        if self.rest_of_epoch is not None:  # the workers work out their rows themselves: new ones, told it
            self._start_workers(self.image_size)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x H x W x 3 on the device -> normalized N x 3 x H x W, channels_last, `dtype`."""
        images = images.permute(0, 3, 1, 2)  # channels_last as it lies
        return images.to(torch.float32).sub_(self._mean).mul_(self._inverse_std).to(self.dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.start_step == self.steps_per_epoch:  # resumed at the end of an epoch: nothing to read
            return
        # Closed (by close() or an error in its workers): new workers, as a DataLoader starts new ones
        # for each pass. Progressive resizing grew the crops: a larger ring.
        if self._batches is None or self.image_size > self._slots.image_size:
            self._start_workers(self.image_size)
        this_pass = (self.epoch if self.train else 0, self.image_size, self.start_step, self.steps_per_epoch)
        if this_pass != self._streamed_next:  # not the pass the workers went on to: start this one
            self._pass.epoch, self._pass.image_size, self._pass.first_step, self._pass.steps = this_pass
            self._stream = stop_workers_on_error(iter(self._batches))  # drops the batches made ahead
        self._streamed_next = None  # until this pass's last batch is handed out
        epoch, size, first_step, steps = this_pass
        try:
            batches = self._on_device_ahead(itertools.islice(self._stream, steps - first_step), first_step)
            for step, batch in enumerate(batches, start=first_step + 1):
                if step == steps:  # the stream is at the next pass now; the trainer asks no further
                    self._streamed_next = (epoch + self._pass.epochs_apart, size, 0, steps)
                yield batch
        except Exception:
            self.close()  # its workers are stopped: a later pass must not wait for them
            raise

    def _on_device_ahead(self, batches: Iterator, first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slots, size = self._slots, self.image_size
        if self.device.type != "cuda":
            for step, (slot, labels) in enumerate(batches, start=first_step):
                images = self._normalized(slots.batch(slot, len(labels), size))  # a new tensor: the slot is free
                yield images, self.padding_labels(torch.from_numpy(labels), step)
            return
        # Batch k+1 is copied and normalized on a side stream while the caller's stream runs step k,
        # as timm's PrefetchLoader does: on the caller's stream the copy would wait behind the step.
        slots.pin()  # the workers exist by now (iter() started them)
        side, caller = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        ready = None
        for step, (slot, labels) in enumerate(batches, start=first_step):
            with torch.cuda.stream(side):
                images = slots.batch(slot, len(labels), size).to(self.device, non_blocking=True)  # the ring is pinned
                slots.copied_on(slot, side)
                labels = torch.from_numpy(labels).pin_memory().to(self.device, non_blocking=True)
                upcoming = self._normalized(images), self.padding_labels(labels, step)
            if ready is not None:
                yield ready
            caller.wait_stream(side)
            for tensor in upcoming:
                tensor.record_stream(caller)  # made on `side`: not reused before the caller is done with it
            ready = upcoming
        if ready is not None:
            yield ready

    def close(self) -> None:
        """Stop the worker processes (they persist across epochs) and free the ring."""
        self._batches = self._stream = self._streamed_next = None  # dropping the DataLoader stops its workers
        if self._slots is not None:
            self._slots.close()
            self._slots = None
