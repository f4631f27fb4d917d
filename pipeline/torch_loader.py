"""The `torch` backend: a reference and fallback with PIL, torchvision transforms and DataLoader workers.

Samples are read straight from the tars at the offsets in the DALI index files (mapped into memory,
through the same `SampleTable` and `SampleReader` as the DALI backends): the webdataset library
streams whole tars, and an exact per-rank split needs sample ranges inside them.
"""

from __future__ import annotations

import atexit
import functools
import io
import multiprocessing
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig, PartLoader
from pipeline.sample_table import SampleReader, SampleTable, shard_table
from pipeline.shard_set import ShardSet
from pipeline.transforms import to_training_layout, torchvision_train_transform, torchvision_val_transform
from shards.image_check import rgb_image

# Set by the main process as it exits; handed to its DataLoader workers by `outlive_job_signals`
# (explicitly, so that it is the same event whatever the start method).
# multiprocessing's own exit handler, which runs after this one (atexit runs handlers in reverse order
# of registration), then stops any worker still alive with SIGTERM.
_MAIN_PROCESS_EXITING = multiprocessing.Event()
atexit.register(_MAIN_PROCESS_EXITING.set)


def _outlive_job_signals(main_process_exiting, worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, main_process_exiting))


def _on_sigterm(main_process_exiting, signum: int, frame) -> None:
    if main_process_exiting.is_set():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


# DataLoader `worker_init_fn`: the worker survives a SIGTERM or SIGINT sent to the whole job.
#
# A scheduler's SIGTERM (Slurm signals every process of a job step) or a terminal's Ctrl-C reaches the
# workers too. torch's workers die of it, and the trainer, which checkpoints and stops on that signal,
# would then fail at its next batch ("DataLoader worker exited unexpectedly"). So SIGINT is ignored,
# and SIGTERM too unless the main process is exiting (then it is multiprocessing stopping the workers
# it left running, which must not hang the exit). Otherwise workers stop when their loader shuts them
# down, or when the main process dies (the DataLoader's watchdog).
outlive_job_signals = functools.partial(_outlive_job_signals, _MAIN_PROCESS_EXITING)


def stop_workers_on_error(batches: Iterator) -> Iterator:
    """The batches of a DataLoader iterator; if it raises, its worker processes are stopped at once.

    The exception's traceback holds the iterator, so its workers would otherwise live as long as the
    exception is kept (pytest keeps it; so may a caller that reports it and goes on), then be
    stopped by the garbage collector, which waited 5 s per worker in the test suite.
    """
    try:
        yield from batches
    except Exception:
        shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:  # torch has no public way; a loader without workers has none to stop
            shutdown()
        raise


class ShardSampleDataset(Dataset):
    """Map-style dataset over `rows[first:]` of a `SampleTable`: (normalized CHW float tensor, int label).

    With `seeds` (a random transform), row j is transformed under torch's generator seeded from
    `seeds + (j,)`: its crop, flip and augmentation depend on nothing else, not on the worker that
    makes it nor on the samples made before it, so a pass can start anywhere in an epoch (`first`)
    and give the same tensors.
    """

    def __init__(
        self, table: SampleTable, rows: np.ndarray, transform, seeds: tuple[int, ...] | None = None, first: int = 0
    ):
        self.table, self.rows, self.transform, self.seeds, self.first = table, rows, transform, seeds, first
        self._reader: SampleReader | None = None  # opened in each worker process, on first use

    def __len__(self) -> int:
        return len(self.rows) - self.first

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._reader is None:
            self._reader = SampleReader(self.table)
        j = self.first + i
        row = int(self.rows[j])
        label = self._reader.label(row)
        try:
            image = rgb_image(Image.open(io.BytesIO(self._reader.image(row))))
        except Exception as err:  # PIL raises many types for bad data
            raise SampleDecodeError(f"{self.table.describe(row)}: cannot be decoded ({err})") from err
        if self.seeds is None:
            return self.transform(image), label
        # torchvision's random transforms draw from torch's global CPU generator. Its state is put
        # back after, so that without workers (in the trainer's own process) the trainer's draws are
        # left as they were. (`torch.manual_seed` would seed every device too: 230 us, not 2.)
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(int(np.random.SeedSequence((*self.seeds, j)).generate_state(1, np.uint64)[0]))
        try:
            return self.transform(image), label
        finally:
            generator.set_state(saved)


class TorchShardLoader(PartLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        self.table = shard_table(shard_set)
        super().__init__(self.table.sizes, split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.start_step == self.steps_per_epoch:  # resumed at the end of an epoch: nothing to read
            return
        # The DALI backends' reading order. Ranks given the same samples (repeated augmentation)
        # read them in the same order, but the samples' seeds, so the crops, are the rank's own.
        rows = self.epoch_rows(self.epoch)
        first, seeds = self.start_step * self.batch_size, None
        if self.train:
            transform = torchvision_train_transform(self.image_size, self.cfg.augment, self.cfg.interpolation)
            seeds = (self.cfg.seed, self.epoch, self.rank)
        else:
            transform = torchvision_val_transform(self.image_size, self.cfg.crop_pct, self.cfg.interpolation)
        batches = DataLoader(
            ShardSampleDataset(self.table, rows, transform, seeds, first),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.cfg.prefetch if self.cfg.workers > 0 else None,
            worker_init_fn=outlive_job_signals,
            # Its own generator for the workers' base seed (unused: the samples have seeds of their
            # own): a draw from torch's global one would shift the trainer's MixUp draws in a resumed run.
            generator=torch.Generator().manual_seed(0),
        )
        for step, (images, labels) in enumerate(stop_workers_on_error(iter(batches)), start=self.start_step):
            labels = labels.to(self.device, non_blocking=True)
            yield to_training_layout(images, self.device, self.dtype), self.padding_labels(labels, step)
