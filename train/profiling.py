"""Profile a few optimizer steps of a real run with torch.profiler (log.profile_steps).

The phase means in the log say how long data, forward, backward and the optimizer take; a trace
says why: which kernels ran, where the host waited, whether DALI's work overlapped the model's.
Each rank records its own steps (a slow rank is what one looks for) and writes a Chrome trace
(chrome://tracing, https://ui.perfetto.dev) and a table of the operators that took longest;
`tools.bench_train --profile` writes the same two files for the benchmark's steps.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from shards.tar_writer import write_atomically
from train.run_log import record_write_error


class StepProfiler:
    """Records optimizer steps [start, start + steps) of this rank's run; does nothing outside them."""

    def __init__(self, start: int, steps: int, out_dir: Path, rank: int, device: torch.device):
        self.start, self.end = start, start + steps
        self.out_dir, self.rank, self.cuda = out_dir, rank, device.type == "cuda"
        self.profiler: profile | None = None
        self.step_range: record_function | None = None
        self.first_step = start

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def before_step(self, global_step: int) -> None:
        """Called before optimizer step `global_step` begins (before its data wait)."""
        if self.profiler is None and self.start <= global_step < self.end:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.first_step = global_step
        if self.profiler is not None:
            # A named range per step (profile.step() marks steps only under a profiler schedule).
            self.step_range = record_function(f"train step {global_step}")
            self.step_range.__enter__()

    def after_step(self, global_step: int) -> list[Path]:
        """Called after optimizer step `global_step`; returns the files written when it was the last."""
        if self.profiler is None:
            return []
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        return self.finish(global_step + 1) if global_step + 1 >= self.end else []

    def finish(self, next_step: int) -> list[Path]:
        """Stop (a run that ends or stops inside the window too) and write what was recorded, steps
        first_step..next_step-1, as `write_profile` does."""
        if self.profiler is None:
            return []
        if self.step_range is not None:  # stopped inside a step
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.cuda:
            torch.cuda.synchronize()  # the last steps' kernels belong in the trace
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        out_stem = self.out_dir / f"rank{self.rank}-steps-{self.first_step}-{next_step - 1}"
        try:
            return write_profile(profiler, self.cuda, out_stem)
        except OSError as err:  # a full disk: named as the run's other records are
            raise record_write_error(Path(f"{out_stem}.*"), err) from err


def write_profile(profiler: profile, cuda: bool, out_stem: Path, header: list[str] | None = None) -> list[Path]:
    """Write `<out_stem>.txt` (`header` lines, then the operators that took longest: by GPU time on
    a GPU, else by CPU time) and `<out_stem>.json.gz` (a Chrome trace: chrome://tracing and
    ui.perfetto.dev open it packed; unpacked, ten steps of a large model run to hundreds of MB).
    Each file is written under a temporary name and renamed, so none is found half-written."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    table, trace = Path(f"{out_stem}.txt"), Path(f"{out_stem}.json.gz")
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    text = profiler.key_averages().table(sort_by=sort_by, row_limit=30)
    write_atomically(table, ("\n".join([*(header or []), text]) + "\n").encode())
    with tempfile.TemporaryDirectory(dir=out_stem.parent) as tmp:
        unpacked = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(unpacked))  # writes a path only: packed here
        if not unpacked.is_file():  # torch's trace writer reports a failed write on stderr alone
            raise OSError("torch.profiler wrote no trace: a full disk? its own message above says more")
        with open(unpacked, "rb") as raw, gzip.open(unpacked.with_suffix(".json.gz"), "wb") as packed:
            shutil.copyfileobj(raw, packed)
        os.replace(unpacked.with_suffix(".json.gz"), trace)
    return [trace, table]
