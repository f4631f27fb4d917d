"""Images/s of each data backend on the same shards, train and val transforms, in one run.

    python -m tools.bench_pipeline --backends dali-gpu,dali-cpu,torch,synthetic --batch-size 256 \
        --seconds 20 --workers 16 [--auto-augment none,trivial_augment_wide] [--interpolation bilinear,bicubic] \
        [--shards DIR] [--json FILE]

Without --shards it converts the 1000 real photographs of ../shared/data/imagenet-sample, each
linked --copies times. Prints each rate and its ratio to `torch`, and the CPU time the loop's own
thread spends in the loader per batch (what the loader takes from a training loop's thread), and the
host cores the process and its DataLoader worker processes kept busy; --json
saves them with the device and library versions. `dali-gpu` is skipped (and said so) where there is
no GPU.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from pipeline.errors import data_error_message
from pipeline.loader import BACKENDS, create_loader
from shards.manifest import read_manifest
from tools.bench_common import (
    add_json_flag,
    add_loader_sweeps,
    at_least_one,
    bench_shards,
    default_device,
    finish_report,
    loader_config,
    loader_runs,
    measure_rate,
    measuring_seconds,
    shard_dir,
    stored_image_exts,
    stored_short_sides,
    switch_text,
    temporary_workdir,
)
from tools.gpu_report import plain_transform

WARMUP_BATCHES = 5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=shard_dir, help="a shard directory (default: convert the shared sample)")
    p.add_argument("--backends", default="dali-gpu,dali-cpu,torch,synthetic")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--batch-size", type=at_least_one, default=256)
    p.add_argument("--image-size", type=at_least_one, default=224)
    p.add_argument("--seconds", type=measuring_seconds, default=20)
    p.add_argument("--dtype", default="float16")
    add_loader_sweeps(p)
    p.add_argument("--copies", type=at_least_one, default=4, help="links per sample photograph in the bench shards")
    add_json_flag(p)
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS or b == "folder"]
    if unknown:
        p.error(f"--backends: {unknown} not in {[b for b in BACKENDS if b != 'folder']}")
    device = default_device()
    results, failed = [], []
    with temporary_workdir() as tmp:
        shards = args.shards or str(bench_shards(tmp, args.copies, max(args.workers)))
        manifest = read_manifest(shards)
        splits = args.splits.split(",")
        stored_sides, stored_exts = stored_short_sides(manifest, splits), stored_image_exts(manifest, splits)
        for split in splits:
            for backend, settings, name in loader_runs(backends, args):
                if split == "val" and "auto_augment" in settings:
                    continue  # val images are not augmented: the same measurement as without
                if backend == "dali-gpu" and device.type != "cuda":
                    print(f"{name:16s} {split:5s} skipped: no GPU")
                    continue
                cfg = loader_config(args, backend, settings, val_image_size=args.image_size, dtype=args.dtype)
                try:
                    loader = create_loader(shards, split, cfg, device=device)
                    rate = measure_rate(loader, device, args.seconds, WARMUP_BATCHES)
                except Exception as err:  # a bad sample, one setting that fails: keep the others' rates
                    error = f"{type(err).__name__}: {data_error_message(err)}"
                    failed.append({"name": name, "split": split, "error": error})
                    print(f"{name:16s} {split:5s} FAILED: {failed[-1]['error']}", flush=True)
                    continue
                row = {"backend": backend, "hw_decoder_load": None, **settings, "name": name, "split": split}
                results.append({**row, **asdict(rate)})
                print(f"{name:16s} {split:5s} {rate.images_per_s:10.1f} images/s", flush=True)
    width = max(16, *(len(r["name"]) for r in results)) if results else 16
    print(
        f"\n{'backend':{width}s} split    images/s   vs torch  within epochs  s/switch  images/epoch"
        "  loader CPU ms  CPU cores  worker cores"
    )
    for r in results:
        torch_rows = (x for x in results if x["backend"] == "torch" and x["split"] == r["split"])
        base = next((x["images_per_s"] for x in torch_rows if plain_transform(x)), None)
        r["vs_torch"] = r["images_per_s"] / base if base else None
        ratio = f"{r['vs_torch']:.2f}x" if base else "-"
        print(
            f"{r['name']:{width}s} {r['split']:5s} {r['images_per_s']:10.1f} {ratio:>9s}"
            f" {r['within_epoch_images_per_s']:14.1f} {switch_text(r['seconds_per_switch']):>9s}"
            f" {r['images_per_epoch']:13d} {r['loader_cpu_ms_per_batch']:14.2f} {r['process_cpu_cores']:10.2f}"
            f" {r['worker_cpu_cores']:13.2f}"
        )
    for failure in failed:
        print(f"FAILED {failure['name']} {failure['split']}: {failure['error']}")
    finish_report("pipeline", args, results, failed, stored_sides, stored_exts)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
