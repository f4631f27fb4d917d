"""One way to get the loaders of a rank: `create_loader(...)`.

Every backend yields the same batch contract: `(images, labels)` on the training device, images
N x 3 x H x W normalized with the ImageNet mean/std in channels_last memory format and the
configured dtype, labels int64 of shape N. In validation, padding samples (added so that every
rank takes the same number of steps) carry the label `PAD_LABEL` (-1): metrics skip them.

    loader = create_loader("/data/imagenet-shards", "train", LoaderConfig(backend="dali-gpu"), rank, world, device)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:
            ...

`loader.set_epoch(epoch, start_step=k)` starts that epoch at batch k, with the batches an unbroken
pass would give from there: a run resumed mid-epoch reads nothing it will not train on. Resumed
with another split (number of processes, batch size), `set_epoch(epoch, k, earlier=EarlierSplit(...))`
reads from batch k on the samples of that epoch the interrupted run had not reached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.auto_augment import AutoAugment
from pipeline.sample_table import SampleTable
from pipeline.split import EarlierSplit, RankPart, rank_part, shuffle_key, split_train
from pipeline.transforms import DEFAULT_CROP_PCT, DTYPES, INTERPOLATIONS, val_resize_size

BACKENDS = ("dali-gpu", "dali-cpu", "torch", "torch-uint8", "synthetic", "folder")
SPLITS = ("train", "val")
PAD_LABEL = -1


@dataclass
class LoaderConfig:
    backend: str = "dali-gpu"  # one of BACKENDS
    batch_size: int = 256  # per rank
    image_size: int = 224  # train crop; can change between epochs (set_image_size)
    val_image_size: int = 224
    crop_pct: float = DEFAULT_CROP_PCT  # val: resize shorter side to size / crop_pct, center crop
    interpolation: str = "bilinear"  # of the train and val resizes: one of INTERPOLATIONS
    workers: int = 8  # DALI threads, or DataLoader worker processes for `torch` and `torch-uint8`
    dtype: str = "float16"  # one of DTYPES
    # Share of images for the hardware JPEG decoder (dali-gpu). 1.0: on an H100 it beat 0.65 in every
    # measurement, training and pipeline alone (docs/PERFORMANCE.md); the rest would be decoded by
    # CUDA kernels that take SMs from the model.
    hw_decoder_load: float = 1.0
    prefetch: int = 2  # batches prepared ahead of the training step
    seed: int = 0
    synthetic_steps: int = 100  # steps per epoch of the synthetic backend without shards
    # Train only: each epoch's samples come this many times, to as many ranks (pipeline/split.py).
    aug_repeats: int = 1
    auto_augment: str = "none"  # train only: one of AUTO_AUGMENTS (pipeline/auto_augment.py)
    rand_augment_ops: int = 2  # RandAugment: operations per image
    rand_augment_magnitude: int = 9  # RandAugment: magnitude bin of each, 0-30 (timm's: its m, 0-10)
    rand_augment_magnitude_std: float = 0.5  # timm's RandAugment: deviation of each drawn magnitude

    @property
    def augment(self) -> AutoAugment:
        return AutoAugment(
            self.auto_augment, self.rand_augment_ops, self.rand_augment_magnitude, self.rand_augment_magnitude_std
        )

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend: {self.backend!r} is not one of {list(BACKENDS)}")
        self.augment.check()
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"data.interpolation: {self.interpolation!r} is not one of {list(INTERPOLATIONS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"data.dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        for name in ("batch_size", "image_size", "val_image_size", "workers", "prefetch", "aug_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"data.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"data.crop_pct must be in (0, 1], got {self.crop_pct}")


class Loader(ABC):
    """Batches of one split for one rank; call `set_epoch` before iterating each epoch.

    Subclasses set `num_classes` (the model's output size).
    """

    num_classes: int

    def __init__(self, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device):
        self.split, self.cfg, self.rank, self.world_size, self.device = split, cfg, rank, world_size, device
        self.train = split == "train"
        self.batch_size = cfg.batch_size
        self.epoch = 0
        self.start_step = 0
        self.image_size = cfg.image_size if self.train else cfg.val_image_size
        self.dtype = DTYPES[cfg.dtype]

    @property
    @abstractmethod
    def steps_per_epoch(self) -> int: ...

    def set_epoch(self, epoch: int, start_step: int = 0, earlier: EarlierSplit | None = None) -> None:
        """Choose the epoch: it decides the shuffle order and which train samples are dropped.

        Iterating then yields its batches from `start_step` on, each the same as in a pass over the
        whole epoch (order, crops, flips and augmentations are functions of seed, epoch, rank and
        position): a run resumed mid-epoch continues exactly without reading the batches before.
        `earlier`: the split of a run that read part of this epoch; the batches from `start_step` on
        then hold the samples it had not reached (loaders over shards or folders; train only).
        """
        self.epoch = epoch
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside epoch {epoch}'s {self.steps_per_epoch} steps")
        self.start_step = start_step

    def set_image_size(self, size: int) -> None:
        """Change the output size from the next epoch on (progressive resizing)."""
        self.image_size = size

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int:
        return self.steps_per_epoch

    def close(self) -> None:  # noqa: B027 - most loaders hold nothing to release
        """Release pipelines, worker processes and temporary files."""

    def val_resize_for(self, image_size: int) -> int:
        return val_resize_size(image_size, self.cfg.crop_pct)


class PartLoader(Loader):
    """A loader over a sample list split by `pipeline.split` (shards or folder files)."""

    table: SampleTable  # where the samples lie; set by each backend

    def __init__(
        self, sizes: list[int], split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        super().__init__(split, cfg, rank, world_size, device)
        self.sizes = sizes
        self.part = self._part(0)  # raises now if the split cannot feed every rank
        self.rest_of_epoch: tuple[int, np.ndarray] | None = None  # (epoch, rows): set_epoch's `earlier`

    def _part(self, epoch: int) -> RankPart:
        return rank_part(
            self.sizes,
            self.train,
            self.rank,
            self.world_size,
            self.batch_size,
            epoch,
            self.cfg.seed,
            self.cfg.aug_repeats,
        )

    def set_epoch(self, epoch: int, start_step: int = 0, earlier: EarlierSplit | None = None) -> None:
        self.part = self._part(epoch)  # first: it decides the epoch's steps
        super().set_epoch(epoch, start_step)
        self.rest_of_epoch = None
        if earlier is not None and self.train:
            self.rest_of_epoch = (epoch, self._rest_of_epoch_rows(earlier))

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Table rows of the rank's part of `epoch` in the order every backend reads them: for train
        shuffled per sample; for an epoch set with `earlier`, the rest of it from `start_step` on."""
        if self.rest_of_epoch is not None and self.rest_of_epoch[0] == epoch:
            return self.rest_of_epoch[1]
        key = shuffle_key(self.rank, self.cfg.aug_repeats)
        return self.table.reading_order(self._part(epoch), self.train, self.cfg.seed, epoch, key)

    def _rest_of_epoch_rows(self, earlier: EarlierSplit) -> np.ndarray:
        """This epoch's rows with those from `start_step` on replaced by this rank's share of the
        samples the earlier run had not read, each on one rank (as many times as the earlier split
        dealt it: once, unless it repeated samples for repeated augmentation).

        The earlier ranks' reading orders are recomputed (pure functions of the split); what they had
        not reached is shuffled alike on every rank and dealt out in equal blocks. What is left over
        (under about two global batches, from rounding the position to this run's steps) is dropped
        for this epoch; what is short is filled with samples the earlier run dropped, then with ones
        it read. Repeated augmentation's copies are not grouped in this rest of an epoch.
        """
        cut = earlier.batches_read * earlier.batch_size
        read, unread = [], []
        for rank in range(earlier.world_size):
            part = split_train(
                self.sizes, rank, earlier.world_size, earlier.batch_size, self.epoch, earlier.seed, earlier.repeats
            )
            rows = self.table.reading_order(part, True, earlier.seed, self.epoch, shuffle_key(rank, earlier.repeats))
            read.append(rows[:cut])
            unread.append(rows[cut:])
        read, unread = np.concatenate(read), np.concatenate(unread)
        never = np.setdiff1d(np.arange(len(self.table)), np.concatenate([read, unread]))
        rng = np.random.default_rng([earlier.seed, self.epoch, earlier.world_size, earlier.batches_read])
        candidates = np.concatenate([rng.permutation(unread), rng.permutation(never), rng.permutation(read)])
        rows = self.epoch_rows(self.epoch).copy()  # the unbroken order: its batches before start_step are not read
        first = self.start_step * self.batch_size
        count = len(rows) - first
        rows[first:] = candidates[self.rank * count : (self.rank + 1) * count]
        return rows

    @property
    def steps_per_epoch(self) -> int:
        return self.part.samples // self.batch_size

    def sample_keys(self) -> list[str]:
        """The keys of this epoch's samples on this rank, in the order its batches hold them (batch s
        holds [s * batch_size, (s + 1) * batch_size)); val padding, marked by its labels, at the end.
        What per-sample labels kept outside the shards (ImageNet-ReaL's) are matched by."""
        return [self.table.key(row) for row in self.epoch_rows(self.epoch).tolist()]

    def padding_labels(self, labels: torch.Tensor, step: int) -> torch.Tensor:
        """Mark the samples of this batch that lie past the rank's real samples (val padding)."""
        first = step * self.batch_size
        if first + len(labels) <= self.part.real_samples:
            return labels
        position = torch.arange(first, first + len(labels), device=labels.device)
        return torch.where(position < self.part.real_samples, labels, torch.full_like(labels, PAD_LABEL))


def create_loader(
    data: str | None,
    split: str,
    cfg: LoaderConfig,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Loader:
    """The loader of `split` for `rank`.

    `data` is a shard directory, or for `folder` an ImageNet root holding `train/<class>/` and
    `val/<class>/`; the `synthetic` backend needs none.
    """
    cfg.check()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    device = torch.device(device)
    if cfg.backend == "dali-gpu" and device.type != "cuda":
        raise ValueError("data.backend 'dali-gpu' needs a CUDA device; use 'dali-cpu' or 'torch' without a GPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the GPU the caller selected, for DALI too
    if cfg.backend == "synthetic":
        from pipeline.synthetic import SyntheticLoader

        return SyntheticLoader(data, split, cfg, rank, world_size, device)
    if data is None:
        raise ValueError(f"data.backend {cfg.backend!r} needs data.shards (a directory)")
    if cfg.backend == "torch":
        from pipeline.shard_set import open_shard_set
        from pipeline.torch_loader import TorchShardLoader

        return TorchShardLoader(open_shard_set(data, split), split, cfg, rank, world_size, device)
    if cfg.backend == "torch-uint8":
        from pipeline.shard_set import open_shard_set
        from pipeline.uint8_loader import Uint8Loader

        return Uint8Loader(open_shard_set(data, split), split, cfg, rank, world_size, device)
    dali_loader = _import_dali_loader(cfg.backend)
    if cfg.backend == "folder":
        from pipeline.folder import list_image_folder

        files, labels = list_image_folder(Path(data) / split)
        return dali_loader.DaliFolderLoader(files, labels, split, cfg, rank, world_size, device)
    from pipeline.shard_set import open_shard_set

    return dali_loader.DaliShardLoader(open_shard_set(data, split), split, cfg, rank, world_size, device)


def _import_dali_loader(backend: str):
    """pipeline.dali_loader, or a ValueError saying how to install DALI when it is missing."""
    try:
        import pipeline.dali_loader as dali_loader
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("nvidia"):
            raise
        raise ValueError(
            f"data.backend {backend!r} needs NVIDIA DALI, which is not installed here ({err}): pip install "
            "nvidia-dali-cuda130 (NVIDIA driver 580 or later; nvidia-dali-cuda120 with 525.60 or later), or "
            "choose data.backend torch"
        ) from err
    return dali_loader
