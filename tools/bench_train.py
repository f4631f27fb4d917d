"""Training-step rate of a model fed by each data backend, against synthetic data in the same run.

    python -m tools.bench_train --model resnet18 --compile --backends dali-gpu,synthetic \
        --batch-size 256 --seconds 20 [--shards DIR] [--json bench_train.json]

The data-stall fraction is 1 - rate(backend) / rate(synthetic): the share of step rate lost to
the pipeline. "host wait" is the share of the time the loop waited for the next batch: a stall
with little wait means the pipeline keeps up but slows the step (it shares the GPU with the model).
"within epochs" is the same ratio with epoch switches left out, "s/switch" what one switch costs (a
bench epoch is far shorter than an ImageNet one, so switches weigh more here than in training),
"loader CPU ms" the CPU time the loop's thread spends in the loader per batch: time it cannot spend
launching the step's kernels; "CPU cores" the host cores the whole process kept busy (DALI's threads
included), "worker cores" those its DataLoader worker processes kept busy (`torch`, `torch-uint8`).
`--workers 8,16` and `--hw-decoder-load 0.65,1` measure the DALI backends with each value (every
combination, one compiled model for all); `--compile reduce-overhead` replays the step's CUDA
graphs. `--backends dali-reference` feeds the step from BASELINES.md's plain DALI pipeline (DALI's
own reader and random-crop decoder, one rank reading every shard): the project's loader against the
straightforward one, in the same run. `dali-predecoded` feeds it images decoded once into host
memory and augmented by DALI as raw-pixel shards are (tools.predecoded_loader): the rate with no
JPEG decoding at all.
Same step code as the trainer (train.step.train_step), bf16 autocast on GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.errors import data_error_message
from pipeline.loader import BACKENDS, create_loader
from pipeline.shard_set import open_shard_set
from shards.manifest import read_manifest
from tools.bench_common import (
    PREDECODED_BACKEND,
    REFERENCE_BACKENDS,
    add_json_flag,
    add_loader_sweeps,
    at_least_one,
    bench_shards,
    default_device,
    finish_report,
    int_list,
    loader_config,
    loader_runs,
    measure_rate,
    measuring_seconds,
    profile_steps,
    shard_dir,
    stored_image_exts,
    stored_short_sides,
    switch_text,
    temporary_workdir,
)
from tools.bench_dali_reference import ReferenceLoader
from tools.compile_modes import COMPILE_MODES, compiled_text
from tools.predecoded_loader import PredecodedLoader
from tools.sm_partition import partial_gpu_stream
from train.model import MODEL_NAMES, build_model
from train.step import AUTOCAST_DTYPES, set_cuda_numerics, train_step

WARMUP_STEPS = 10  # compile, cuDNN autotuning and the first pipeline build happen here
PROFILED_STEPS = 20  # enough to see a pattern, few enough for a trace of a few MB


def measurement_plan(backends: list[str], args) -> list[tuple[str, dict, int | None, str]]:
    """(backend, loader settings, model_sms, row name) of each measurement, in order.

    The DALI backends are measured with each swept loader setting (`bench_common.loader_runs`),
    other backends once. With --model-sms, every measurement is repeated with the step confined to
    that many SMs; synthetic data on the whole GPU stays the denominator of every ratio.
    """
    plan = []
    hw_decoder_backends = ("dali-gpu", *REFERENCE_BACKENDS) if torch.cuda.is_available() else ("dali-gpu",)
    for model_sms in [None, *(args.model_sms or [])]:
        for backend, settings, name in loader_runs(backends, args, hw_decoder_backends):
            run_name = name if model_sms is None else f"{name}, step on {model_sms} SMs"
            plan.append((backend, settings, model_sms, run_name))
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=shard_dir, help="a shard directory (default: convert the shared sample)")
    p.add_argument("--model", default="resnet18", choices=MODEL_NAMES, metavar="NAME", help="a torchvision classifier")
    p.add_argument("--blurpool", action="store_true", help="with FFCV's BlurPool (model.blurpool): its step cost")
    p.add_argument(
        "--drop-path", type=float, metavar="RATE", help="with stochastic depth at this rate (model.drop_path): its cost"
    )
    p.add_argument(
        "--backends",
        default="dali-gpu,synthetic",
        help="always compared with synthetic; dali-reference: BASELINES.md's plain DALI pipeline"
        " (tools.bench_dali_reference); dali-predecoded: images decoded once, augmented as raw-pixel shards are",
    )
    p.add_argument("--batch-size", type=at_least_one, default=256)
    p.add_argument("--image-size", type=at_least_one, default=224)
    p.add_argument("--seconds", type=measuring_seconds, default=20)
    p.add_argument("--precision", choices=list(AUTOCAST_DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile the model, in this mode (default: 'default'); reduce-overhead replays CUDA graphs",
    )
    add_loader_sweeps(p)
    p.add_argument("--prefetch", type=int, default=2, help="batches the pipeline prepares ahead of the step")
    p.add_argument("--copies", type=at_least_one, default=4, help="links per sample photograph in the bench shards")
    p.add_argument(
        "--model-sms",
        type=int_list,
        help="also measure every backend with the step confined to this many SMs (a comma list measures each;"
        " the rest stay free for DALI's kernels)",
    )
    add_json_flag(p)
    p.add_argument(
        "--profile", metavar="DIR", help="after each rate, profile --profile-steps steps into DIR (table and trace)"
    )
    p.add_argument(
        "--profile-steps", type=int, default=PROFILED_STEPS, help=f"steps per profile (default: {PROFILED_STEPS})"
    )
    args = p.parse_args(argv)
    if args.profile_steps < 1:
        p.error("--profile-steps must be at least 1")
    device = default_device()
    if args.model_sms and device.type != "cuda":
        p.error("--model-sms: needs a CUDA GPU (it confines the step to part of the GPU's SMs)")
    precision = args.precision or ("bfloat16" if device.type == "cuda" else "float32")
    # synthetic first: the model is compiled and autotuned during its warm-up, not during a backend's
    backends = ["synthetic"] + [b for b in args.backends.split(",") if b != "synthetic"]
    choices = [*BACKENDS, *REFERENCE_BACKENDS, PREDECODED_BACKEND]
    if any(b not in choices for b in backends):
        p.error(f"--backends: choose from {choices}")
    results, failed = [], []
    with temporary_workdir() as tmp:
        shards = args.shards or str(bench_shards(tmp, args.copies, max(args.workers)))
        manifest = read_manifest(shards)
        stored_sides, stored_exts = stored_short_sides(manifest, ["train"]), stored_image_exts(manifest, ["train"])
        # opened once: it reads and checks every index file, which for ImageNet takes seconds
        other_feeds = set(backends) & {*REFERENCE_BACKENDS, PREDECODED_BACKEND}
        feed_shards = open_shard_set(shards, "train") if other_feeds else None
        num_classes = len(manifest.classes)
        # One model for every backend: compiled once, so each backend is measured on the same code.
        torch.manual_seed(0)
        set_cuda_numerics(device, precision)
        model = build_model(
            args.model, num_classes, blurpool=args.blurpool, image_size=args.image_size, drop_path=args.drop_path
        ).to(device)
        step_model = torch.compile(model, mode=args.compile) if args.compile else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

        def step(images, labels):
            train_step(step_model, optimizer, criterion, images, labels, precision)

        def measure(backend: str, settings: dict, placement, run_name: str):
            """One row: the step fed by one loader setting, on `placement`'s stream if given."""
            if backend in REFERENCE_BACKENDS:
                loader = ReferenceLoader(
                    feed_shards,
                    args.batch_size,
                    args.image_size,
                    settings["workers"],
                    settings.get("hw_decoder_load", 0.0),  # absent: decoded on the CPU
                    device,
                    getattr(torch, precision),
                )
            elif backend == PREDECODED_BACKEND:
                loader = PredecodedLoader(
                    feed_shards,
                    args.batch_size,
                    args.image_size,
                    settings["workers"],
                    device,
                    getattr(torch, precision),
                )
            else:  # inputs arrive in the dtype autocast computes in
                cfg = loader_config(args, backend, settings, dtype=precision, prefetch=args.prefetch)
                loader = create_loader(shards, "train", cfg, device=device)
            with torch.cuda.stream(placement.stream) if placement else contextlib.nullcontext():
                rate = measure_rate(loader, device, args.seconds, WARMUP_STEPS, step)
                if args.profile:
                    stem = f"{args.model}{compiled_text(args.compile).replace(' ', '-')}-{run_name.replace(' ', '-')}"
                    profile_steps(loader, device, step, args.profile_steps, Path(args.profile) / stem)
            return rate

        streams = {}  # --model-sms: the step's stream for each SM count
        for backend, settings, model_sms, run_name in measurement_plan(backends, args):
            if backend == "dali-gpu" and device.type != "cuda":
                print(f"{run_name:16s} skipped: no GPU")
                continue
            placement = None
            try:
                if model_sms is not None:
                    if model_sms not in streams:
                        streams[model_sms] = partial_gpu_stream(device, model_sms)
                    placement = streams[model_sms]
                rate = measure(backend, settings, placement, run_name)
            except Exception as err:  # one setting of a sweep that fails must not lose the others' rates
                failed.append({"name": run_name, "error": f"{type(err).__name__}: {data_error_message(err)}"})
                print(f"{run_name:16s} FAILED: {failed[-1]['error']}", flush=True)
                continue
            results.append(
                {
                    "backend": backend,
                    "hw_decoder_load": None,
                    **settings,
                    "model_sms": placement.num_sms if placement else None,
                    "name": run_name,
                    **asdict(rate),
                }
            )
            print(f"{run_name:16s} {rate.images_per_s:10.1f} images/s", flush=True)
    full_gpu_synthetic = next((r for r in results if r["backend"] == "synthetic" and r["model_sms"] is None), None)
    if full_gpu_synthetic is None:
        print("synthetic data on the whole GPU was not measured: no ratio to report", file=sys.stderr)
        return 1
    synthetic = full_gpu_synthetic["images_per_s"]
    label = f"{args.model}{compiled_text(args.compile)}, {precision}, batch {args.batch_size}"
    within_synthetic = full_gpu_synthetic["within_epoch_images_per_s"]
    width = max(16, *(len(r["name"]) for r in results))
    print(
        f"\n{label}\n{'backend':{width}s}   images/s  vs synthetic  data stall  host wait  within epochs  s/switch"
        "  loader CPU ms  CPU cores  worker cores"
    )
    for r in results:
        r["vs_synthetic"] = r["images_per_s"] / synthetic
        r["within_epoch_vs_synthetic"] = r["within_epoch_images_per_s"] / within_synthetic
        print(
            f"{r['name']:{width}s} {r['images_per_s']:10.1f} {r['vs_synthetic']:12.3f} {1 - r['vs_synthetic']:11.1%}"
            f" {r['data_wait_fraction']:10.1%} {r['within_epoch_vs_synthetic']:14.3f}"
            f" {switch_text(r['seconds_per_switch']):>9s} {r['loader_cpu_ms_per_batch']:14.2f}"
            f" {r['process_cpu_cores']:10.2f} {r['worker_cpu_cores']:13.2f}"
        )
    for failure in failed:
        print(f"FAILED {failure['name']}: {failure['error']}")
    finish_report("train", args, results, failed, stored_sides, stored_exts)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
