"""Shared by the benchmarks: the bench shards, the device, library versions, JSON output."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.loader import LoaderConfig
from shards.convert import ConvertOptions, convert
from tools.make_demo_data import build_demo_imagenet, link_sample_tree


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


def float_list(text: str) -> list[float]:
    """argparse type for a comma list of numbers, e.g. --hw-decoder-load 0.65,1.0."""
    return [float(x) for x in text.split(",")]


def backend_runs(backends: list[str], hw_loads: list[float]) -> list[tuple[str, float | None, str]]:
    """(backend, hw_decoder_load, row name) per measurement: dali-gpu once for each load in the sweep."""
    runs = []
    for backend in backends:
        for load in hw_loads if backend == "dali-gpu" else [None]:
            runs.append((backend, load, backend if load is None else f"{backend} hw={load:g}"))
    return runs


def loader_config(args, backend: str, hw_decoder_load: float | None, **settings) -> LoaderConfig:
    """The loader settings of one measurement: the benchmarks' shared flags, then `settings`."""
    if hw_decoder_load is not None:
        settings["hw_decoder_load"] = hw_decoder_load
    return LoaderConfig(
        backend=backend, batch_size=args.batch_size, image_size=args.image_size, workers=args.workers, **settings
    )


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
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def finish_report(benchmark: str, args, results: list[dict]) -> None:
    """Print what produced the numbers and write them, with that, to --json if given."""
    env = environment()
    print(f"device: {env['gpu'] or 'CPU'}, {env['cpu_count']} cores, torch {env['torch']}, DALI {env['dali']}")
    if args.json:
        payload = {"benchmark": benchmark, "args": vars(args), "environment": env, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}")


def temporary_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="bench-")


@dataclass
class Rate:
    images_per_s: float
    data_wait_fraction: float  # share of the timed span the host spent waiting for the next batch


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
    slows the step by sharing the GPU (no wait, yet a lower rate than synthetic data).
    """
    batches, images_done, epoch, started, waited = 0, 0, 0, None, 0.0
    try:
        while True:
            loader.set_epoch(epoch)
            batch_iterator = iter(loader)
            while True:
                asked = time.perf_counter()
                batch = next(batch_iterator, None)
                if batch is None:
                    break
                if started is not None:
                    waited += time.perf_counter() - asked
                images, labels = batch
                work(images, labels)
                batches += 1
                if started is None:
                    if batches == warmup_batches:
                        _sync(device)
                        started = time.perf_counter()
                    continue
                images_done += len(images)
                if time.perf_counter() - started >= seconds:
                    _sync(device)
                    elapsed = time.perf_counter() - started
                    return Rate(images_done / elapsed, waited / elapsed)
            epoch += 1
    finally:
        loader.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
