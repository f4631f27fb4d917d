"""The `synthetic` backend: one random batch already on the device, to measure the model's own step rate."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipeline.loader import Loader, LoaderConfig
from shards.manifest import read_manifest

IMAGENET_CLASSES = 1000


class SyntheticLoader(Loader):
    def __init__(
        self, data: str | None, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        super().__init__(split, cfg, rank, world_size, device)
        if data is not None:
            manifest = read_manifest(data)
            self.num_classes = len(manifest.classes)
            self._steps = max(1, manifest.splits[split].samples // (world_size * self.batch_size))
        else:
            self.num_classes = IMAGENET_CLASSES
            self._steps = cfg.synthetic_steps
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def set_image_size(self, size: int) -> None:
        super().set_image_size(size)
        self._batch = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._batch is None:
            generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.rank)
            shape = (self.batch_size, 3, self.image_size, self.image_size)
            images = torch.randn(shape, device=self.device, generator=generator).to(self.dtype)
            labels = torch.randint(self.num_classes, (self.batch_size,), device=self.device, generator=generator)
            self._batch = images.contiguous(memory_format=torch.channels_last), labels
        for _ in range(self._steps - self.start_step):
            yield self._batch
