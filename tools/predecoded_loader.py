"""A feed for `tools.bench_train` with no JPEG decoding: images decoded once into host memory, then
cropped, resized, flipped and normalized by DALI on the GPU, batch after batch.

Beside compiled ResNet-18 the step fed by dali-gpu waits for DALI's decoding: each image's GPU work
after the hardware decoder (a colour-conversion kernel) queues behind the model's kernels, image
after image (docs/PERFORMANCE.md, tenth session). This feed runs the loaders' own train graph on
pixels (`imagenet_pipeline` with `raw_pixels`, as for `make_shards --train-raw-pixels` shards): it
keeps DALI's batched work and drops the per-image decoding. Its rate beside the model bounds what
storing decoded pixels can give, with the shards' reading left out. A benchmark yardstick, not a
loader: it cycles a few hundred images of the shards.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from nvidia.dali.tensors import TensorCPU, TensorListCPU
from PIL import Image

from pipeline.dali_loader import shut_down
from pipeline.dali_pipeline import imagenet_pipeline
from pipeline.sample_table import SampleReader, shard_table
from pipeline.shard_set import ShardSet
from pipeline.transforms import random_resized_crops
from shards.image_check import rgb_image

PREDECODED_IMAGES = 512  # distinct images held decoded; each batch draws from them at random


class PredecodedLoader:
    """The first `images` samples of a shard split, decoded once (PIL), fed as training batches.

    The loader interface `bench_common.measure_rate` uses: channels_last NCHW batches of `dtype` and
    int64 labels on `device`; an "epoch" is as many batches as the split holds.
    """

    def __init__(
        self,
        shard_set: ShardSet,
        batch_size: int,
        image_size: int,
        threads: int,
        device: torch.device,
        dtype: torch.dtype = torch.float16,
        images: int = PREDECODED_IMAGES,
        seed: int = 0,
    ):
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.steps_per_epoch = shard_set.num_samples // batch_size
        table = shard_table(shard_set)
        reader = SampleReader(table)
        try:
            count = min(images, len(table))
            decoded = [np.asarray(rgb_image(Image.open(io.BytesIO(reader.image(row))))) for row in range(count)]
            self._labels = np.array([reader.label(row) for row in range(count)], np.int64)
        finally:
            reader.close()
        # Wrapped once: a batch is then a list of references, not 256 new DALI tensors per step.
        self._tensors = [TensorCPU(image, "HWC") for image in decoded]
        self._heights = np.array([image.shape[0] for image in decoded])
        self._widths = np.array([image.shape[1] for image in decoded])
        self._decoded = decoded  # the tensors above do not own these arrays
        self._rng = np.random.default_rng(seed)
        on_gpu = device.type == "cuda"
        self._pipeline_args = dict(
            source=self._next_inputs,
            train=True,
            image_size=image_size,
            val_resize=image_size,  # unused by the train graph
            decode_on_gpu=on_gpu,
            hw_decoder_load=1.0,  # unused: nothing is decoded
            output_float16=True,
            raw_pixels=True,
            batch_size=batch_size,
            num_threads=threads,
            device_id=device.index if on_gpu else None,
            prefetch_queue_depth=2,
        )
        self._pipe, self._batches = None, None

    def _next_inputs(self) -> tuple[TensorListCPU, ...]:
        chosen = self._rng.integers(len(self._tensors), size=self.batch_size)
        anchors, shapes = random_resized_crops(self._heights[chosen], self._widths[chosen], self._rng)
        flips = self._rng.integers(0, 2, self.batch_size, dtype=np.int32)
        images = TensorListCPU([self._tensors[i] for i in chosen.tolist()], layout="HWC", contiguous=False)
        per_sample = (self._labels[chosen], anchors, shapes, flips)
        return images, *(TensorListCPU(values) for values in per_sample)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._pipe is None:  # built on first use, and again after `close` (as the project's loaders)
            self._pipe = imagenet_pipeline(**self._pipeline_args)
            self._pipe.build()
            self._batches = DALIGenericIterator([self._pipe], ["images", "labels"], size=-1)
        for _ in range(self.steps_per_epoch):
            batch = next(self._batches)[0]
            images = batch["images"].permute(0, 3, 1, 2).to(self.device, dtype=self.dtype, non_blocking=True)
            yield images, batch["labels"].view(-1).to(self.device, non_blocking=True)

    def close(self) -> None:
        if self._pipe is not None:
            shut_down(self._pipe)
            self._pipe, self._batches = None, None
