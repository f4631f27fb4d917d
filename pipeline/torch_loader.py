"""The `torch` backend: a reference and fallback with PIL, torchvision transforms and DataLoader workers.

Samples are read straight from the tars at the offsets in the DALI index files (os.pread, through
the same `SampleTable` as the DALI backends): the webdataset library streams whole tars, and an
exact per-rank split needs sample ranges inside them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig, PartLoader
from pipeline.sample_table import SampleTable, shard_table
from pipeline.shard_set import ShardError, ShardSet
from pipeline.transforms import to_training_layout, torchvision_train_transform, torchvision_val_transform


class ShardSampleDataset(Dataset):
    """Map-style dataset over rows of a `SampleTable`: (normalized CHW float tensor, int label)."""

    def __init__(self, table: SampleTable, rows: np.ndarray, transform):
        self.table, self.rows, self.transform = table, rows, transform
        self._files: dict[int, int] = {}  # open descriptors, per worker process

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, row: int, offset: int, size: int) -> bytes:
        path = int(self.table.path_index[row])
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(self.table.paths[path], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ShardError(f"{self.table.describe(row)}: {size} bytes expected at offset {offset}, got {len(data)}")
        return data

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.rows[i])
        table = self.table
        raw_label = self._read(row, int(table.label_offset[row]), int(table.label_size[row]))
        try:
            label = int(raw_label)
        except ValueError:
            raise ShardError(f"{table.describe(row)}: label {raw_label[:16]!r} is not a class number") from None
        data = self._read(row, int(table.offset[row]), int(table.size[row]))
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as err:  # PIL raises many types for bad data
            raise SampleDecodeError(f"{table.describe(row)}: cannot be decoded ({err})") from err
        return self.transform(image), label


class TorchShardLoader(PartLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        self.table = shard_table(shard_set)
        super().__init__(self.table.sizes, split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.table.rows(self.part)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 10_007 + self.rank)
        if self.train:
            rows = rows[torch.randperm(len(rows), generator=generator).numpy()]
            transform = torchvision_train_transform(self.image_size)
        else:
            transform = torchvision_val_transform(self.image_size, self.cfg.crop_pct)
        batches = DataLoader(
            ShardSampleDataset(self.table, rows, transform),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.cfg.prefetch if self.cfg.workers > 0 else None,
            generator=generator,
        )
        for step, (images, labels) in enumerate(batches):
            labels = labels.to(self.device, non_blocking=True)
            yield to_training_layout(images, self.device, self.dtype), self.padding_labels(labels, step)
