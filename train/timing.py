"""Where step time goes: data wait, forward, backward, optimizer, gradient all-reduce.

On a GPU the phases are CUDA events, read only at log time (no extra host sync in the step); on a
CPU they are wall-clock times. The timers wrap the step; they do not change it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.profiler import record_function

from train.profiling import StepProfiler

PHASES = ("data", "forward", "backward", "optimizer")


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000.0


class PhaseTimer:
    """Times the phases of each step (`with timer.phase("forward"): ...`); `summary()` averages them.

    Device phases are CUDA events on a GPU (no host sync); the data phase is the host's wait for
    the next batch, wall-clock (the loaders sync on their own outputs).
    """

    def __init__(self, device: torch.device, profiler: StepProfiler | None = None):
        self.clock = _Clock(device)
        self.spans: list[tuple[str, object, object]] = []
        self.host_data_s = 0.0
        self.steps = 0
        self.profiler = profiler  # while it records, each phase is a named range in its trace

    def _range(self, name: str):
        return record_function(name) if self.profiler is not None and self.profiler.active else nullcontext()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.clock.now()
        with self._range(name):
            yield
        self.spans.append((name, start, self.clock.now()))

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        start = time.perf_counter()
        with self._range("data"):
            yield
        self.host_data_s += time.perf_counter() - start

    def step_done(self) -> None:
        self.steps += 1

    def data_ms(self) -> float:
        """Mean host wait for data per optimizer step since the last summary (no sync needed)."""
        return self.host_data_s * 1000.0 / max(self.steps, 1)

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per optimizer step for each phase since the last summary (call after a sync)."""
        totals = dict.fromkeys(PHASES, 0.0)
        for phase, start, end in self.spans:
            totals[phase] += self.clock.elapsed_ms(start, end)
        totals["data"] = self.host_data_s * 1000.0
        steps = max(self.steps, 1)
        self.spans, self.host_data_s, self.steps = [], 0.0, 0
        return {phase: total / steps for phase, total in totals.items()}


class SyncTimer:
    """Span of DDP's gradient all-reduce per step: first bucket launched to last bucket reduced.

    Installed as a DDP communication hook that wraps the default all-reduce, so the overlap of
    communication with backward is kept; the span is measured, not serialised.
    """

    def __init__(self, ddp_model: torch.nn.parallel.DistributedDataParallel, device: torch.device):
        self.clock = _Clock(device)
        self.first = None
        self.last = None
        self.spans: list[tuple[object, object]] = []
        self.steps = 0
        ddp_model.register_comm_hook(dist.group.WORLD, self._hook)

    def _hook(self, process_group, bucket):
        if self.first is None:
            self.first = self.clock.now()
        future = allreduce_hook(process_group, bucket)

        def finished(fut):
            self.last = self.clock.now()
            return fut.value()[0]

        return future.then(finished)

    def step_done(self) -> None:
        if self.first is not None and self.last is not None:
            self.spans.append((self.first, self.last))
        self.first = self.last = None
        self.steps += 1

    def summary(self) -> float:
        """Mean all-reduce span in ms per optimizer step since the last summary (call after a sync)."""
        total = sum(self.clock.elapsed_ms(start, end) for start, end in self.spans)
        steps = max(self.steps, 1)
        self.spans, self.steps = [], 0
        return total / steps
