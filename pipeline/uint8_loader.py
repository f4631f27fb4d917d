"""The `torch-uint8` backend: whole batches cropped and resized as uint8 in DataLoader worker
processes, copied to the GPU as uint8 and normalized there.

Made for train splits stored as raw pixels (`tools.make_shards --train-raw-pixels`): a worker reads
a PPM's pixels straight from the mapped tar, cuts the crop and resizes it with torchvision's uint8
kernels, so per batch the GPU sees one copy (on a side stream, overlapping the step) and a few
elementwise kernels, nothing per image. JPEG samples are decoded with PIL first, which is slow
beside DALI: on JPEG shards prefer `dali-gpu`. This is the design of timm's and FFCV's fast
loaders (uint8 batches, normalization on the GPU) over this project's shards and split.

Train crop windows and flips are drawn exactly as the DALI backends draw them, from
(seed, epoch, rank, step) with `transforms.random_resized_crops`, so the batches match `dali-cpu`'s
up to the resize's rounding (tested). The workers persist across epochs: each batch is requested
as (epoch, image size, step).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision.transforms.v2 import functional as F

from pipeline.errors import SampleDecodeError
from pipeline.image_header import UnreadableHeader, encoded_image_size, ppm_pixels
from pipeline.loader import LoaderConfig, PartLoader
from pipeline.sample_table import SampleReader, SampleTable, shard_table
from pipeline.shard_set import ShardSet
from pipeline.split import rank_part
from pipeline.torch_loader import outlive_job_signals, stop_workers_on_error
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD, random_resized_crops, val_resize_size


class Uint8Batches(Dataset):
    """Batch `(epoch, image_size, step)` of one rank's part as (uint8 N x S x S x 3, int64 labels).

    Runs in worker processes: everything it needs to find a batch's rows is a pure function of the
    split's parameters, so persistent workers serve epoch after epoch.
    """

    def __init__(self, table: SampleTable, train: bool, cfg: LoaderConfig, rank: int, world_size: int, batch_size: int):
        self.table, self.train, self.cfg = table, train, cfg
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self._reader: SampleReader | None = None  # opened in each worker, on first use
        self._rows_epoch: int | None = None
        self._rows = np.empty(0, np.int64)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Table rows of the rank's part of `epoch`, in the DALI backends' reading order (kept per epoch)."""
        if epoch != self._rows_epoch:
            part = rank_part(
                self.table.sizes, self.train, self.rank, self.world_size, self.batch_size, epoch, self.cfg.seed
            )
            self._rows = self.table.reading_order(part, self.train, self.cfg.seed, epoch, self.rank)
            self._rows_epoch = epoch
        return self._rows

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, size, step = key
        if self._reader is None:
            self._reader = SampleReader(self.table)
        rows = self.epoch_rows(epoch)[step * self.batch_size : (step + 1) * self.batch_size].tolist()
        stored = [self._stored(row) for row in rows]
        labels = torch.tensor([self._reader.label(row) for row in rows], dtype=torch.int64)
        images = _new_batch((len(rows), size, size, 3))
        if self.train:
            heights, widths = np.array([self._height_width(row, s) for row, s in zip(rows, stored, strict=True)]).T
            rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, step])
            anchors, shapes = random_resized_crops(heights, widths, rng)
            flips = rng.integers(0, 2, len(rows), dtype=np.int32)
            for i, (row, s) in enumerate(zip(rows, stored, strict=True)):
                (x, y), (w, h) = anchors[i].astype(int), shapes[i].astype(int)
                crop = _channels_first(self._pixels(row, s)[y : y + h, x : x + w])
                resized = F.resize(crop, [size, size], antialias=True).permute(1, 2, 0)
                images[i] = resized.flip(1) if flips[i] else resized
        else:
            resize = val_resize_size(size, self.cfg.crop_pct)
            for i, (row, s) in enumerate(zip(rows, stored, strict=True)):
                image = F.resize(_channels_first(self._pixels(row, s)), [resize], antialias=True)
                images[i] = F.center_crop(image, [size, size]).permute(1, 2, 0)
        return images, labels

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
            return np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
        except Exception as err:  # PIL raises many types for bad data
            raise SampleDecodeError(f"{self.table.describe(row)}: cannot be decoded ({err})") from err


def _channels_first(pixels: np.ndarray) -> torch.Tensor:
    """A contiguous copy of H x W x 3 pixels seen as 3 x H x W: torchvision's fast uint8 resize path
    (channels last). From a strided view of the tar it ran 2.5x slower on the CPU machine, and the
    mapped tar is read-only."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)


def _new_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized uint8 tensor; in a worker process, in shared memory, so that handing it to
    the main process copies nothing (what `default_collate` does: 10 ms per batch of 256 at 224 px
    on the CPU machine)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))  # private, but what default_collate calls
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class EpochSteps(Sampler):
    """The keys of one pass, (epoch, image size, step) for each step, as the loader last set them.

    Holds the values, not the loader: a loader that is dropped (after an error, say) is then freed at
    once, and its DataLoader with it, which stops the workers.
    """

    def __init__(self):
        self.epoch, self.image_size, self.steps = 0, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return ((self.epoch, self.image_size, step) for step in range(self.steps))

    def __len__(self) -> int:
        return self.steps


class Uint8Loader(PartLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        self.table = shard_table(shard_set)
        super().__init__(self.table.sizes, split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes
        self._pass = EpochSteps()
        self._batches = DataLoader(
            Uint8Batches(self.table, self.train, cfg, rank, world_size, self.batch_size),
            batch_size=None,
            sampler=self._pass,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=cfg.prefetch,
            persistent_workers=True,
            worker_init_fn=outlive_job_signals,
        )
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor([m * 255 for m in IMAGENET_MEAN], device=device).view(shape)
        self._inverse_std = torch.tensor([1 / (s * 255) for s in IMAGENET_STD], device=device).view(shape)

    def _on_device(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 N x H x W x 3 -> normalized N x 3 x H x W on the device, channels_last, `dtype`."""
        images = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # channels_last as it lies
        images = images.to(torch.float32).sub_(self._mean).mul_(self._inverse_std).to(self.dtype)
        return images, self.padding_labels(labels.to(self.device, non_blocking=True), step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._batches is None:
            raise RuntimeError("this torch-uint8 loader is closed (by close(), or by an error in its workers)")
        self._pass.epoch, self._pass.image_size, self._pass.steps = self.epoch, self.image_size, self.steps_per_epoch
        try:
            yield from self._on_device_ahead(stop_workers_on_error(iter(self._batches)))
        except Exception:
            self._batches = None  # its workers are stopped: a later pass must not wait for them
            raise

    def _on_device_ahead(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for step, (images, labels) in enumerate(batches):
                yield self._on_device(images, labels, step)
            return
        # Batch k+1 is copied and normalized on a side stream while the caller's stream runs step k,
        # as timm's PrefetchLoader does: on the caller's stream the copy would wait behind the step.
        side, caller = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        ready = None
        for step, (images, labels) in enumerate(batches):
            with torch.cuda.stream(side):
                upcoming = self._on_device(images, labels, step)
            if ready is not None:
                yield ready
            caller.wait_stream(side)
            for tensor in upcoming:
                tensor.record_stream(caller)  # made on `side`: not reused before the caller is done with it
            ready = upcoming
        if ready is not None:
            yield ready

    def close(self) -> None:
        """Stop the worker processes (they persist across epochs): dropping the DataLoader shuts them down."""
        self._batches = None
