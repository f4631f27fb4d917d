"""Shared by the benchmarks: the bench shards, the device, library versions, JSON output."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import torch

from pipeline.auto_augment import AUTO_AUGMENTS
from pipeline.loader import LoaderConfig
from pipeline.transforms import INTERPOLATIONS
from shards.convert import ConvertOptions, convert
from shards.manifest import MANIFEST_NAME, Manifest
from shards.tar_writer import write_atomically
from tools.gpu_report import stored_text
from tools.make_demo_data import build_demo_imagenet, link_sample_tree
from train.profiling import write_profile


def shard_dir(path: str) -> str:
    """argparse type of `--shards`: a directory written by tools.make_shards, checked before any work."""
    if not (Path(path) / MANIFEST_NAME).is_file():
        raise argparse.ArgumentTypeError(
            f"{path}: no {MANIFEST_NAME} (is this a directory written by tools.make_shards?)"
        )
    return path


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """`--json FILE`, checked before any measurement (which may take minutes): a file in a folder
    that exists and can be written to."""
    parser.add_argument("--json", type=json_path, help="write the results here")


def json_path(path: str) -> str:
    folder = Path(path).parent
    if Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: there is no folder {folder}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: cannot write in {folder}")
    return path


def bench_shards(workdir: str | Path, copies: int, workers: int) -> Path:
    """Shards of the shared real photographs, each `copies` times (generated images without them).

    The split keeps every rank's epoch a whole number of batches, so a benchmark needs many
    samples per epoch; `copies` provides them from the same real files.
    """
    workdir = Path(workdir)
    train = link_sample_tree(workdir / "src", copies)
    if train is None:
        train = build_demo_imagenet(workdir / "src", num_classes=100, train_per_class=10 * copies) / "train"
    out = workdir / "shards"
    convert(ConvertOptions(out=str(out), train=str(train), val=str(train), workers=workers, progress_bar=False))
    return out


HW_LOAD_HELP = "dali-gpu: share of JPEGs for the hardware decoder; a comma list measures each (e.g. 0.65,1.0)"
WORKERS_HELP = "DALI threads / DataLoader workers; a comma list measures the DALI backends with each"
AUTO_AUGMENT_HELP = (
    "train augmentation (data.auto_augment; rand_augment with 2 operations at bin 9, rand_augment_timm as timm's "
    "rand-m9-mstd0.5-inc1); a comma list measures each, "
    "e.g. none,trivial_augment_wide"
)
INTERPOLATION_HELP = "resize filter (data.interpolation); a comma list measures each, e.g. bilinear,bicubic"
AUGMENT_SUFFIXES = {
    "trivial_augment_wide": " +TA",
    "rand_augment": " +RA",
    "auto_augment_imagenet": " +AA",
    "rand_augment_timm": " +RAtimm",
}
# tools.bench_train's feeds besides the project's loaders: BASELINES.md's plain DALI pipeline
# (tools.bench_dali_reference), and images decoded once, augmented as raw pixels (tools.predecoded_loader)
REFERENCE_BACKENDS = ("dali-reference",)
PREDECODED_BACKEND = "dali-predecoded"


def add_loader_sweeps(parser) -> None:
    """The loader settings every benchmark can sweep, each a comma list: --workers, --hw-decoder-load,
    --auto-augment, --interpolation."""
    parser.add_argument("--workers", type=int_list, default=[os.cpu_count() or 1], help=WORKERS_HELP)
    parser.add_argument("--hw-decoder-load", type=float_list, default=[1.0], help=HW_LOAD_HELP)
    parser.add_argument("--auto-augment", type=choice_list(AUTO_AUGMENTS), default=["none"], help=AUTO_AUGMENT_HELP)
    parser.add_argument(
        "--interpolation", type=choice_list(INTERPOLATIONS), default=["bilinear"], help=INTERPOLATION_HELP
    )


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type for a comma list of values out of `choices`, e.g. none,trivial_augment_wide."""

    def parse(text: str) -> list[str]:
        values = text.split(",")
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"{unknown} not in {list(choices)}")
        return values

    return parse


def at_least_one(text: str) -> int:
    """argparse type of a whole number of at least 1 (--batch-size, --image-size, --copies, ...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def measuring_seconds(text: str) -> float:
    """argparse type of a measuring time: a finite number above 0 (NaN would never end a measurement)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type for a comma list of whole numbers, e.g. --workers 16,32 (a setting that cannot
    be built, such as 0 DALI threads, is reported as failed and the others measured)."""
    return [int(x) for x in text.split(",")]


def float_list(text: str) -> list[float]:
    """argparse type for a comma list of finite numbers, e.g. --hw-decoder-load 0.65,1.0."""
    values = [float(x) for x in text.split(",")]
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers, got {text}")
    return values


def loader_runs(
    backends: list[str], args, hw_decoder_backends: Sequence[str] = ("dali-gpu",)
) -> list[tuple[str, dict, str]]:
    """(backend, loader settings, row name) per measurement, in order.

    The backends in `hw_decoder_backends` are measured once per --hw-decoder-load, and the DALI
    backends once per --workers; other backends once, with the first --workers. Every loader backend
    is measured once per --auto-augment and --interpolation (`synthetic` and the reference feeds,
    which have no such steps, once). A name says the settings that are swept.
    """
    runs = []
    for backend in backends:
        dali = backend.startswith("dali") or backend == "folder"
        fixed_transform = backend in ("synthetic", PREDECODED_BACKEND, *REFERENCE_BACKENDS)
        sweep = itertools.product(
            [None] if fixed_transform else args.interpolation,
            [None] if fixed_transform else args.auto_augment,
            args.hw_decoder_load if backend in hw_decoder_backends else [None],
            args.workers if dali else args.workers[:1],
        )
        for interpolation, augment, load, workers in sweep:
            name = backend if load is None else f"{backend} hw={load:g}"
            if dali and len(args.workers) > 1:
                name += f" {workers} threads"
            settings = {"workers": workers}
            if load is not None:
                settings["hw_decoder_load"] = load
            if augment not in (None, "none"):
                name += AUGMENT_SUFFIXES[augment]
                settings["auto_augment"] = augment
            if interpolation not in (None, "bilinear"):
                name += f" {interpolation}"
                settings["interpolation"] = interpolation
            runs.append((backend, settings, name))
    return runs


def loader_config(args, backend: str, settings: dict, **more) -> LoaderConfig:
    """The loader settings of one measurement: the benchmarks' shared flags, its own, then `more`."""
    return LoaderConfig(backend=backend, batch_size=args.batch_size, image_size=args.image_size, **settings, **more)


def default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def environment() -> dict:
    """What produced the numbers: machine, card, library versions."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.node(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    # Hardware work queues the CUDA driver gives this process's streams (default 8): streams beyond
    # that share a queue, and work from two streams in one queue runs in the order it was queued.
    info["cuda_device_max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def stored_short_sides(manifest: Manifest, splits: Sequence[str]) -> dict[str, int | None]:
    """Each split's stored maximum short side (the converter's --max-short-side options); None where
    images were stored as given.

    Smaller stored images decode faster: their rates are not those of full-size ImageNet JPEGs.
    """
    made = manifest.splits
    return {split: made[split].max_short_side if split in made else None for split in splits}


def stored_image_exts(manifest: Manifest, splits: Sequence[str]) -> dict[str, str]:
    """Each split's stored image member: "jpg", or "ppm" where the converter stored raw pixels
    (no JPEG decoding when read: not rates of ImageNet JPEGs either)."""
    return {split: manifest.splits[split].image_ext for split in splits if split in manifest.splits}


def finish_report(
    benchmark: str,
    args,
    results: list[dict],
    failed: Sequence[dict] = (),
    stored_sides: dict[str, int | None] | None = None,
    stored_exts: dict[str, str] | None = None,
) -> None:
    """Print what produced the numbers and write them, with that, to --json if given.

    `failed`: measurements that raised ({"name", "error"}), kept in the file beside the rates.
    `stored_sides`, `stored_exts`: the measured splits' `stored_short_sides` and `stored_image_exts`,
    kept in the file.
    """
    env = environment()
    stored = stored_text(stored_sides or {}, stored_exts)
    print(f"device: {env['gpu'] or 'CPU'}, {env['cpu_count']} cores, torch {env['torch']}, DALI {env['dali']}{stored}")
    if args.json:
        payload = {"benchmark": benchmark, "args": vars(args), "environment": env, "results": results}
        payload["stored_short_side_max"] = stored_sides or {}
        payload["stored_image_ext"] = stored_exts or {}
        payload["failed"] = list(failed)
        try:
            write_atomically(Path(args.json), (json.dumps(payload, indent=1) + "\n").encode())
        except OSError as err:  # a full disk: the figures are printed above all the same
            raise SystemExit(f"{benchmark}: cannot write --json {args.json} ({err.strerror or err})") from None
        print(f"wrote {args.json}")


def temporary_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="bench-")


@dataclass
class Rate:
    images_per_s: float  # over the whole timed span, epoch switches included
    data_wait_fraction: float  # share of the timed span the host spent waiting for the next batch
    within_epoch_images_per_s: float  # over the spans inside epochs, switches left out
    epoch_switches: int  # epoch ends inside the timed span
    seconds_per_switch: float | None  # time an epoch switch costs beyond one step (None: no switch)
    images_per_epoch: int  # so a rate can be extrapolated to another epoch length
    loader_cpu_ms_per_batch: float  # CPU time the calling (training) thread spends getting one batch
    # CPU cores the whole process kept busy over the timed span: every thread (DALI's too), not
    # DataLoader worker processes. Shows whether the host has cores left.
    process_cpu_cores: float
    worker_cpu_cores: float  # the same for its child processes (DataLoader workers); 0 for DALI


def measure_rate(
    loader,
    device: torch.device,
    seconds: float,
    warmup_batches: int,
    work: Callable[[torch.Tensor, torch.Tensor], object] = lambda images, labels: None,
) -> Rate:
    """Images/s over `seconds` after `warmup_batches`, cycling epochs as training does.

    `work` runs on every batch (nothing for a pipeline alone, a training step for bench_train).
    The clock starts and stops after a device sync, so queued GPU work is counted. The host's wait
    for batches tells a pipeline that cannot keep up (the wait grows) from one that keeps up but
    slows the step by sharing the GPU (no wait, yet a lower rate than synthetic data). The CPU
    time the calling thread spends in the loader is what the loader takes from the training loop's
    own thread, which on a GPU must also launch each step's kernels; the CPU time of the whole
    process (DALI's threads included) says how many of the host's cores the run keeps busy.
    The device is also synced at each epoch's end and after each epoch's first batch, which splits
    the span into epochs and switches: a benchmark epoch is far shorter than an ImageNet one, so the
    rate within epochs and the cost of a switch are reported apart.
    """
    batches, images_done, epoch, started, waited = 0, 0, 0, None, 0.0
    span_start, span_seconds, span_images, switches = None, 0.0, 0, 0
    loader_cpu, timed_batches, process_cpu_started, workers_cpu_started = 0.0, 0, 0.0, 0.0
    try:
        while True:
            loader.set_epoch(epoch)
            batch_iterator = iter(loader)
            first_of_epoch = True
            while True:
                asked, asked_cpu = time.perf_counter(), time.thread_time()
                batch = next(batch_iterator, None)
                if batch is None:
                    break
                if started is not None:
                    waited += time.perf_counter() - asked
                    loader_cpu += time.thread_time() - asked_cpu
                    timed_batches += 1
                images, labels = batch
                work(images, labels)
                batches += 1
                if started is None:
                    first_of_epoch = False
                    if batches == warmup_batches:
                        started = span_start = _synced_time(device)
                        process_cpu_started, workers_cpu_started = time.process_time(), children_cpu_seconds()
                    continue
                images_done += len(images)
                if first_of_epoch:
                    span_start = _synced_time(device)  # the switch ends with the epoch's first step
                    first_of_epoch = False
                else:
                    span_images += len(images)
                if time.perf_counter() - started >= seconds:
                    ended = _synced_time(device)
                    span_seconds += ended - span_start
                    cpu = (
                        loader_cpu / timed_batches * 1e3,
                        (time.process_time() - process_cpu_started) / (ended - started),
                        (children_cpu_seconds() - workers_cpu_started) / (ended - started),
                    )
                    return _rate(
                        loader, ended - started, images_done, waited, span_seconds, span_images, switches, *cpu
                    )
            if started is not None:
                span_seconds += _synced_time(device) - span_start
                switches += 1
            epoch += 1
    finally:
        loader.close()


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's child processes (DataLoader workers), on Linux.

    Ended children count through getrusage once reaped; live ones (persistent workers) are read
    from /proc. The difference of two readings is the children's CPU time between them.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, ticks = usage.ru_utime + usage.ru_stime, os.sysconf("SC_CLK_TCK")
    for children in glob("/proc/self/task/*/children"):
        with open(children) as listing:
            pids = listing.read().split()
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            except OSError:  # ended since it was listed: its time is in getrusage once reaped
                continue
            seconds += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)
    return seconds


def _rate(
    loader,
    elapsed,
    images,
    waited,
    span_seconds,
    span_images,
    switches,
    loader_cpu_ms,
    process_cpu_cores,
    worker_cpu_cores,
) -> Rate:
    within = span_images / span_seconds if span_seconds > 0 and span_images else images / elapsed
    # A switch span holds one step (the new epoch's first batch) besides the switch itself.
    per_switch = (elapsed - span_seconds - (images - span_images) / within) / switches if switches else None
    if per_switch is not None:
        per_switch = max(per_switch, 0.0)  # below zero only by step-time noise: no measurable cost
    images_per_epoch = loader.steps_per_epoch * loader.batch_size
    return Rate(
        images / elapsed,
        waited / elapsed,
        within,
        switches,
        per_switch,
        images_per_epoch,
        loader_cpu_ms,
        process_cpu_cores,
        worker_cpu_cores,
    )


def profile_steps(
    loader,
    device: torch.device,
    work: Callable[[torch.Tensor, torch.Tensor], object],
    steps: int,
    out_stem: Path,
) -> None:
    """`steps` batches of `loader`, each followed by `work`, under torch.profiler.

    Writes `<out_stem>.txt` (the busiest operators: by GPU time on a GPU, else by CPU time) and
    `<out_stem>.json.gz` (a trace for chrome://tracing or ui.perfetto.dev). The host's wait for each
    batch and each step are named ranges, so the trace shows where the GPU idles: waiting for the
    loader, for the host, or sharing its SMs with the pipeline's own kernels.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = _batches_across_epochs(loader)
    try:
        for _ in range(3):  # settle after the (re)build of the pipeline
            work(*next(batches))
        _sync(device)
        # The ranges' host time is clocked here: the profiler's own totals for them read 0 on a GPU.
        host_seconds = {"wait for batch": 0.0, "step": 0.0}
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                started = time.perf_counter()
                with record_function("wait for batch"):
                    images, labels = next(batches)
                asked = time.perf_counter()
                with record_function("step"):
                    work(images, labels)
                host_seconds["wait for batch"] += asked - started
                host_seconds["step"] += time.perf_counter() - asked
            _sync(device)
    finally:
        batches.close()
        loader.close()
    summary = [
        f"{name}: {seconds * 1e3:.1f} ms of host time over {steps} steps" for name, seconds in host_seconds.items()
    ]
    write_profile(profiler, device.type == "cuda", out_stem, [*summary, ""])


def _batches_across_epochs(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def switch_text(seconds_per_switch: float | None) -> str:
    return "-" if seconds_per_switch is None else f"{seconds_per_switch:.3f}"


def _synced_time(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
