"""The `torch` backend: a reference and fallback with PIL, torchvision transforms and DataLoader workers.

Samples are read straight from the tars at the offsets in the DALI index files (os.pread): the
webdataset library streams whole tars, and an exact per-rank split needs sample ranges inside them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig, PartLoader
from pipeline.shard_set import SampleRef, ShardSet
from pipeline.transforms import to_training_layout, torchvision_train_transform, torchvision_val_transform


class ShardSampleDataset(Dataset):
    """Map-style dataset over sample references: (normalized CHW float tensor, int label)."""

    def __init__(self, refs: list[SampleRef], transform):
        self.refs = refs
        self.transform = transform
        self._files: dict[str, int] = {}  # open descriptors, per worker process

    def __len__(self) -> int:
        return len(self.refs)

    def _read(self, path: str, offset: int, size: int) -> bytes:
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        ref = self.refs[i]
        label = int(self._read(ref.tar_path, ref.cls_offset, ref.cls_size))
        data = self._read(ref.tar_path, ref.jpg_offset, ref.jpg_size)
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as err:  # PIL raises many types for bad data
            raise SampleDecodeError(f"{ref.tar_path}: sample {ref.key}: cannot be decoded ({err})") from err
        return self.transform(image), label


class TorchShardLoader(PartLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        self.shard_set = shard_set
        super().__init__(shard_set.sizes, split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        refs = self.shard_set.sample_refs(self.part)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 10_007 + self.rank)
        if self.train:
            refs = [refs[i] for i in torch.randperm(len(refs), generator=generator).tolist()]
            transform = torchvision_train_transform(self.image_size)
        else:
            transform = torchvision_val_transform(self.image_size, self.cfg.crop_pct)
        batches = DataLoader(
            ShardSampleDataset(refs, transform),
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
