"""Images/s of torch-uint8's workers from a cold page cache against a warm one: can this disk feed them?

    python -m tools.bench_cold_read --shards DIR --workers 16 --batch-size 256 --image-size 224 [--steps N]

Train shards stored as raw pixels (`tools.make_shards --train-raw-pixels`) are large, about 335 GB
for ImageNet at short side 256, so a node's page cache may not hold them and every epoch is then read
from the disk, in random order. Each pass first evicts the split's tars from the page cache
(`posix_fadvise(DONTNEED)`: no privileges needed, but pages that another process has mapped, or a
file system that ignores the hint, stay cached), then `--workers` processes make the first `--steps`
batches of an epoch (default: all) as torch-uint8's DataLoader workers do (read, crop, resize into a
uint8 batch; no copy to a device), then make them again from the now warm page cache. Prints both
rates, their ratio, and the disk's read rate in the cold pass. JPEG train shards work too (the
workers then decode with PIL).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np
import torch

from pipeline.errors import SampleDecodeError
from pipeline.loader import LoaderConfig
from pipeline.sample_table import SampleTable, shard_table
from pipeline.shard_set import ShardError, open_shard_set
from pipeline.uint8_loader import Uint8Batches
from shards.manifest import read_manifest
from tools.bench_common import add_json_flag, finish_report, shard_dir, stored_image_exts

SPLIT = "train"
WARM_ENOUGH = 0.9  # cold/warm above this: the disk kept up, or the pages were not evicted


def evict(paths: list[str]) -> None:
    """Drop these files from the page cache (their clean pages that no process has mapped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# Set in the parent before the pool forks, so the workers share the table without pickling it.
_TABLE: SampleTable | None = None


def _make_batches(job: tuple[int, list[int], LoaderConfig]) -> None:
    """One worker's share of the pass: batches `steps` of `epoch`, each written into one reused buffer."""
    epoch, steps, cfg = job
    torch.set_num_threads(1)  # as in a DataLoader worker
    size = cfg.image_size
    ring = torch.empty((1, cfg.batch_size * size * size * 3), dtype=torch.uint8)
    batches = Uint8Batches(_TABLE, True, cfg, 0, 1, cfg.batch_size, ring)
    for step in steps:
        batches[(epoch, size, step, 0)]
    batches.close()  # unmapped: the next eviction must find no page mapped


def timed_pass(pool, workers: int, epoch: int, steps: int, cfg: LoaderConfig) -> float:
    """Seconds for `workers` processes to make batches 0..steps-1 of `epoch`, step k by worker k % workers."""
    jobs = [(epoch, list(range(w, steps, workers)), cfg) for w in range(workers)]
    started = time.perf_counter()
    pool.map(_make_batches, jobs, chunksize=1)
    return time.perf_counter() - started


def measure_passes(workers: int, passes: int, steps: int, cfg: LoaderConfig) -> list[dict]:
    """Per pass (epoch 0, 1, ...): evict the split's tars, time the pass cold, then time it again warm."""
    results = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        order = Uint8Batches(_TABLE, True, cfg, 0, 1, cfg.batch_size, torch.empty(0))  # the workers' rows
        for epoch in range(passes):
            rows = order.epoch_rows(epoch)[: steps * cfg.batch_size]
            stored_bytes = int((_TABLE.sample_ends(rows) - _TABLE.sample_starts(rows)).sum())
            evict(_TABLE.paths)
            cold = timed_pass(pool, workers, epoch, steps, cfg)
            warm = timed_pass(pool, workers, epoch, steps, cfg)
            images = steps * cfg.batch_size
            results.append(
                {
                    "epoch": epoch,
                    "images": images,
                    "cold_images_per_s": images / cold,
                    "warm_images_per_s": images / warm,
                    "cold_over_warm": warm / cold,
                    "cold_read_mb_per_s": stored_bytes / cold / 1e6,
                    "mean_sample_kb": stored_bytes / images / 1e3,
                }
            )
            r = results[-1]
            print(
                f"epoch {epoch}: cold {r['cold_images_per_s']:8.0f}  warm {r['warm_images_per_s']:8.0f} images/s",
                flush=True,
            )
    return results


def main(argv: list[str] | None = None) -> int:
    global _TABLE
    p = argparse.ArgumentParser(prog="python -m tools.bench_cold_read", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=shard_dir, required=True, help="a shard directory (its train split is read)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (as data.workers)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=0, help="batches per pass (0: a whole epoch)")
    p.add_argument("--passes", type=int, default=2, help="cold-then-warm passes, each a new epoch's order")
    add_json_flag(p)
    args = p.parse_args(argv)
    if min(args.workers, args.batch_size, args.image_size, args.passes) < 1 or args.steps < 0:
        p.error("--workers, --batch-size, --image-size and --passes must be at least 1, --steps at least 0")

    try:
        _TABLE = shard_table(open_shard_set(args.shards, SPLIT))
    except ShardError as err:  # e.g. no train split, or an index that does not match its tar
        p.error(str(err))
    epoch_steps = len(_TABLE) // args.batch_size
    steps = min(args.steps or epoch_steps, epoch_steps)
    if steps == 0:
        p.error(f"--batch-size {args.batch_size}: the train split has only {len(_TABLE)} samples")
    cfg = LoaderConfig(backend="torch-uint8", batch_size=args.batch_size, image_size=args.image_size)
    try:
        results = measure_passes(args.workers, args.passes, steps, cfg)
    except (ShardError, SampleDecodeError) as err:  # raised in a worker, raised again here by the pool
        print(f"bench_cold_read: data error: {err}", file=sys.stderr)
        return 1

    print(
        f"\ntorch-uint8 workers from the page cache emptied / full: {args.workers} processes, batch"
        f" {args.batch_size}, {args.image_size} px, {steps} of {epoch_steps} steps per pass"
    )
    print("epoch   cold img/s   warm img/s   cold/warm   cold read MB/s   KB/sample")
    for r in results:
        print(
            f"{r['epoch']:5d} {r['cold_images_per_s']:12.0f} {r['warm_images_per_s']:12.0f}"
            f" {r['cold_over_warm']:11.3f} {r['cold_read_mb_per_s']:16.0f} {r['mean_sample_kb']:11.0f}"
        )
    if np.median([r["cold_over_warm"] for r in results]) > WARM_ENOUGH:
        print(
            f"cold within {1 - WARM_ENOUGH:.0%} of warm: the disk kept up, or the pages were not evicted"
            " (mapped by another process, or a file system that ignores posix_fadvise)"
        )
    finish_report("cold_read", args, results, stored_exts=stored_image_exts(read_manifest(args.shards), [SPLIT]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
