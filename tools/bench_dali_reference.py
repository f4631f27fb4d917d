"""The raw DALI rate on the same shards: DALI's own reader and random-crop decoder, no split, cycled.

    python -m tools.bench_dali_reference --shards DIR --batch-size 256 --seconds 8 --workers 8,16

This is the pipeline ../shared/BASELINES.md measured (`fn.readers.webdataset` over the tars and
their .idx files, `decoders.image_random_crop`, resize, `crop_mirror_normalize` to float16), run
in the same session as `tools.bench_pipeline` so that the project's `dali-gpu` loader can be
compared with it on one machine: the target is >= 95% of this rate. It is a yardstick, not a
loader: one rank reads every shard, and epochs are not exact (DALI's reader shuffles in a buffer).
Without a GPU it decodes on the CPU (`--device cpu`), which is how the tests run it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.dali_loader import shut_down
from pipeline.shard_set import ShardSet, open_shard_set
from pipeline.transforms import PIXEL_MEAN, PIXEL_STD
from shards.manifest import label_digits
from tools.bench_common import (
    HW_LOAD_HELP,
    add_json_flag,
    at_least_one,
    finish_report,
    float_list,
    int_list,
    measure_rate,
    measuring_seconds,
    shard_dir,
    stored_short_sides,
)

WARMUP_BATCHES = 10


@pipeline_def(enable_conditionals=False)
def reference_pipeline(tars: list[str], index_files: list[str], image_size: int, decoder: str, hw_decoder_load: float):
    """BASELINES.md's pipeline."""
    jpegs, labels = fn.readers.webdataset(
        paths=tars, index_paths=index_files, ext=["jpg", "cls"], random_shuffle=True, name="Reader"
    )
    decode_args = {"output_type": types.RGB, "device": decoder}
    if decoder == "mixed":
        decode_args["hw_decoder_load"] = hw_decoder_load
    images = fn.decoders.image_random_crop(jpegs, **decode_args)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    flip = fn.random.coin_flip()
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16, output_layout="HWC", mean=list(PIXEL_MEAN), std=list(PIXEL_STD), mirror=flip
    )
    return images, labels


class ReferenceLoader:
    """The reference pipeline behind the loader interface `bench_common.measure_rate` and
    `tools.bench_train` use: NCHW (channels_last) batches of `dtype` and int64 labels on `device`.

    So the training step can be fed by BASELINES.md's plain DALI pipeline in the same run as by the
    project's `dali-gpu` loader. Its labels come from each sample's `.cls` text (fixed-width digits, as
    `tools.make_shards` writes them), turned into numbers on the device. An "epoch" is the split's
    whole batches; DALI's reader runs on across epochs, shuffling in its buffer, so `set_epoch`
    changes nothing.
    """

    def __init__(
        self,
        shard_set: ShardSet,
        batch_size: int,
        image_size: int,
        threads: int,
        hw_decoder_load: float,
        device: torch.device,
        dtype: torch.dtype = torch.float16,
    ):
        if shard_set.image_ext != "jpg":
            raise ValueError(
                f"{shard_set.directory}: the {shard_set.split} split stores {shard_set.image_ext} images;"
                " BASELINES.md's pipeline decodes JPEGs"
            )
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.steps_per_epoch = shard_set.num_samples // batch_size
        on_gpu = device.type == "cuda"
        self._pipeline_args = dict(
            tars=[str(shard_set.tar_path(i)) for i in range(len(shard_set.shards))],
            index_files=[str(shard_set.directory / s.index_file) for s in shard_set.shards],
            image_size=image_size,
            decoder="mixed" if on_gpu else "cpu",
            hw_decoder_load=hw_decoder_load,
            batch_size=batch_size,
            num_threads=threads,
            device_id=device.index if on_gpu else None,
            prefetch_queue_depth=2,
        )
        digits = label_digits(shard_set.num_classes)
        self._digit_values = torch.tensor([10**k for k in reversed(range(digits))], device=device)
        self._pipe, self._batches = None, None

    def set_epoch(self, epoch: int) -> None:
        pass

    def _next(self) -> dict:
        if self._pipe is None:  # built on first use, and again after `close` (as the project's loaders)
            self._pipe = reference_pipeline(**self._pipeline_args)
            self._pipe.build()
            self._batches = DALIGenericIterator([self._pipe], ["images", "labels"], reader_name="Reader")
        try:
            return next(self._batches)[0]
        except StopIteration:  # the reader's epoch ended (iterating with `for` would reset it twice)
            self._batches.reset()
            return next(self._batches)[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps_per_epoch):
            batch = self._next()
            images = batch["images"].permute(0, 3, 1, 2).to(self.device, dtype=self.dtype, non_blocking=True)
            digits = batch["labels"].to(self.device, non_blocking=True).long() - ord("0")
            yield images, (digits * self._digit_values).sum(1)

    def close(self) -> None:
        if self._pipe is not None:
            shut_down(self._pipe)
            self._pipe, self._batches = None, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_dali_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=shard_dir, required=True, help="a shard directory (tools.make_shards)")
    p.add_argument("--batch-size", type=at_least_one, default=256)
    p.add_argument("--image-size", type=at_least_one, default=224)
    p.add_argument("--seconds", type=measuring_seconds, default=8)
    p.add_argument("--workers", type=int_list, default=[8], help="DALI threads; a comma list measures each")
    p.add_argument("--hw-decoder-load", type=float_list, default=[1.0], help=HW_LOAD_HELP)
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    add_json_flag(p)
    args = p.parse_args(argv)
    loads = args.hw_decoder_load if args.device == "gpu" else [None]
    shard_set = open_shard_set(args.shards, "train")
    if shard_set.image_ext != "jpg":
        p.error(
            f"--shards: the train split stores {shard_set.image_ext} images (raw pixels); this pipeline decodes JPEGs"
        )
    name = f"DALI reader + random-crop decode ({'mixed' if args.device == 'gpu' else 'cpu'})"
    results = []
    print("pipeline                                  threads  hw_decoder_load  images/s")
    device = torch.device("cuda", 0) if args.device == "gpu" else torch.device("cpu")
    for threads in args.workers:
        for load in loads:
            loader = ReferenceLoader(
                shard_set, args.batch_size, args.image_size, threads, 0.0 if load is None else load, device
            )
            rate = measure_rate(loader, device, args.seconds, WARMUP_BATCHES).images_per_s
            results.append({"name": name, "threads": threads, "hw_decoder_load": load, "images_per_s": rate})
            print(f"{name:42s}{threads:7d}  {'-' if load is None else format(load, 'g'):>15s}  {rate:8,.0f}")
    finish_report("bench_dali_reference", args, results, stored_sides=stored_short_sides(shard_set.manifest, ["train"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
