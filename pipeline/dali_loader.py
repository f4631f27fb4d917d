"""DALI loaders: shards (`dali-gpu`, `dali-cpu`) and image folders (`folder`)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from pipeline.dali_pipeline import file_reader, imagenet_pipeline, shard_reader
from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig, PartLoader, ascii_labels_to_int
from pipeline.shard_set import ShardSet
from pipeline.split import RankPart


@dataclass
class _EpochRun:
    """A built pipeline for one epoch's part at one image size, its first batches already in flight."""

    epoch: int
    image_size: int
    part: RankPart
    pipe: object
    batches: DALIGenericIterator
    finished: bool = False  # read to the end of the reader's epoch (only then can it be rewound)


class DaliLoader(PartLoader):
    """One DALI pipeline per train epoch, built in the background while the previous epoch runs.

    The per-epoch split reaches DALI's reader as new index files, which needs a new pipeline; the
    build (and its first batches) overlaps the previous epoch, so the training loop never waits for
    it; on an H100 the switch still leaves the GPU idle for about 1 s (docs/PERFORMANCE.md).
    The val part never changes, so its pipeline is kept and rewound.
    """

    def __init__(
        self, sizes: list[int], split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        super().__init__(sizes, split, cfg, rank, world_size, device)
        self.decode_on_gpu = device.type == "cuda" and cfg.backend != "dali-cpu"
        self._builder: ThreadPoolExecutor | None = None  # started by the first train epoch
        self._next: Future | None = None  # the next train epoch's run, being built
        self._kept: _EpochRun | None = None  # the val run, reused

    def _reader(self, part: RankPart, epoch_dir: Path) -> Callable:
        raise NotImplementedError

    def _labels(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _find_undecodable(self, part: RankPart, first: int, last: int) -> str | None:
        """Name of the first sample in positions [first, last) of the part that PIL cannot decode."""
        raise NotImplementedError

    def _build(self, epoch: int, image_size: int) -> _EpochRun:
        part = self._part(epoch)
        epoch_dir = Path(self._tmpdir) / f"epoch-{epoch}"
        shutil.rmtree(epoch_dir, ignore_errors=True)
        epoch_dir.mkdir(parents=True)
        for old in Path(self._tmpdir).glob("epoch-*"):
            # index files of finished epochs (an ImageNet rank writes ~15 MB of them per epoch)
            if int(old.name.split("-")[1]) < epoch - 1:
                shutil.rmtree(old, ignore_errors=True)
        pipe = imagenet_pipeline(
            read=self._reader(part, epoch_dir),
            train=self.train,
            image_size=image_size,
            val_resize=self.val_resize_for(image_size),
            decode_on_gpu=self.decode_on_gpu,
            hw_decoder_load=self.cfg.hw_decoder_load,
            # DALI has no bfloat16: half-width float16 out (normalized values fit it easily), cast after.
            output_float16=self.dtype in (torch.float16, torch.bfloat16),
            batch_size=self.batch_size,
            num_threads=self.cfg.workers,
            device_id=self.device.index if self.decode_on_gpu else None,
            prefetch_queue_depth=self.cfg.prefetch,
            seed=_seed(self.cfg.seed, epoch, self.rank),
        )
        pipe.build()
        try:
            # Making the iterator runs the pipeline: decode errors can surface here.
            batches = DALIGenericIterator(
                [pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=LastBatchPolicy.DROP
            )
        except RuntimeError as err:
            named = self._name_undecodable(err, part, 0)
            if named is None:
                raise
            raise named from err
        return _EpochRun(epoch, image_size, part, pipe, batches)

    def _take_run(self) -> _EpochRun:
        kept, self._kept = self._kept, None
        if kept is not None and kept.finished and kept.image_size == self.image_size:
            kept.batches.reset()
            kept.finished = False
            return kept
        if self._next is not None:
            run = self._next.result()
            self._next = None
            if (run.epoch, run.image_size) == (self.epoch, self.image_size):
                return run
        return self._build(self.epoch, self.image_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        run = self._take_run()
        if self.train:
            if self._builder is None:
                self._builder = ThreadPoolExecutor(1, thread_name_prefix="dali-build")
            self._next = self._builder.submit(self._build, self.epoch + 1, self.image_size)
        else:
            self._kept = run
        step = 0
        try:
            for step in range(self.steps_per_epoch):
                out = next(run.batches)[0]
                # DALI gives NHWC; the permuted view is NCHW in channels_last memory format, no copy.
                images = out["images"].permute(0, 3, 1, 2)
                images = images.to(self.device, dtype=self.dtype, non_blocking=True)
                labels = self._labels(out["labels"].to(self.device, non_blocking=True))
                yield images, self.padding_labels(labels, step)
            # The reader's epoch ends exactly here; reaching its end lets the val run rewind.
            # (Not `for ... in run.batches`: iter() on a DALI iterator resets it.)
            try:
                next(run.batches)
                raise RuntimeError(f"DALI produced more than {self.steps_per_epoch} batches for one epoch")
            except StopIteration:
                run.finished = True
        except RuntimeError as err:
            named = self._name_undecodable(err, run.part, step)
            if named is None:
                raise
            raise named from err

    def _name_undecodable(self, err: RuntimeError, part: RankPart, step: int) -> SampleDecodeError | None:
        """DALI's decode errors do not say which sample; find it with PIL near the failing step."""
        if "decoder" not in str(err):
            return None
        window = self.cfg.shuffle_buffer + (self.cfg.prefetch + 2) * self.batch_size
        start = max(0, step * self.batch_size - self.batch_size)
        name = self._find_undecodable(part, start, start + window) or self._find_undecodable(part, 0, part.samples)
        if name is None:
            return None
        return SampleDecodeError(f"{name}: cannot be decoded ({self.cfg.backend}, {self.split} step {step})")

    def close(self) -> None:
        if self._next is not None:
            self._next.cancel() or self._next.exception()  # wait for a build in flight
            self._next = None
        self._kept = None
        if self._builder is not None:
            self._builder.shutdown(wait=True)
            self._builder = None  # a later epoch starts a new one: a closed loader can be read again
        super().close()


class DaliShardLoader(DaliLoader):
    def __init__(
        self, shard_set: ShardSet, split: str, cfg: LoaderConfig, rank: int, world_size: int, device: torch.device
    ):
        self.shard_set = shard_set
        super().__init__(shard_set.sizes, split, cfg, rank, world_size, device)
        self.num_classes = shard_set.num_classes

    def _reader(self, part: RankPart, epoch_dir: Path) -> Callable:
        tars, indexes = self.shard_set.write_rank_indexes(part, epoch_dir)
        return shard_reader(tars, indexes, shuffle=self.train, shuffle_buffer=self.cfg.shuffle_buffer)

    def _labels(self, raw: torch.Tensor) -> torch.Tensor:
        return ascii_labels_to_int(raw)

    def _find_undecodable(self, part: RankPart, first: int, last: int) -> str | None:
        for ref in self.shard_set.sample_refs(part)[first:last]:
            with open(ref.tar_path, "rb") as f:
                f.seek(ref.jpg_offset)
                data = f.read(ref.jpg_size)
            if _pil_error(data):
                return f"{ref.tar_path}: sample {ref.key}"
        return None


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
        self.files, self.labels = files, labels
        super().__init__([1] * len(files), split, cfg, rank, world_size, device)
        self.num_classes = max(labels) + 1

    def _part_files(self, part: RankPart) -> tuple[list[str], list[int]]:
        indices = [p.shard for p in part.pieces for _ in range(len(p))]
        return [self.files[i] for i in indices], [self.labels[i] for i in indices]

    def _reader(self, part: RankPart, epoch_dir: Path) -> Callable:
        files, labels = self._part_files(part)
        return file_reader(files, labels, shuffle=self.train, shuffle_buffer=self.cfg.shuffle_buffer)

    def _labels(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.view(-1).to(torch.int64)

    def _find_undecodable(self, part: RankPart, first: int, last: int) -> str | None:
        for path in self._part_files(part)[0][first:last]:
            if _pil_error(Path(path).read_bytes()):
                return path
        return None


def _pil_error(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return False
    except Exception:  # PIL raises many types for bad data
        return True


def _seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible DALI seed per (seed, epoch, rank), within DALI's int range."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**31 - 1)
