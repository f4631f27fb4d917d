"""What a run reports as it trains: each log window's losses, gradient norms, data waits and
votes (stop, checkpoint), reduced across ranks at each log step (the one host sync between log
lines), and the console lines and scalars made of them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from train.distributed import DistContext, all_reduce_sum
from train.run_log import SilentLog
from train.signals import StopRequest


def log_profile(log: SilentLog, written: list[Path], world_size: int) -> None:
    """Name rank 0's profile files once they are written (every rank writes its own)."""
    if written:
        trace, table = written
        first, last = trace.name.removesuffix(".json.gz").split("-")[2:]  # rank0-steps-20-29.json.gz
        ranks = " on every rank" if world_size > 1 else ""
        log.line(
            f"profiled steps {first}-{last}{ranks}: {trace} (chrome://tracing or ui.perfetto.dev), the slowest "
            f"operators in {table.name}" + ("; other ranks' files beside them" if world_size > 1 else "")
        )


class LogWindow:
    """Per-step losses kept on the device between log lines, read at log time (one host sync)."""

    def __init__(self, size: int, ctx: DistContext, start_step: int):
        self.ctx = ctx
        self.losses = torch.zeros(size, device=ctx.device)
        self.grad_norms = torch.zeros(size, device=ctx.device)
        self.reset(start_step)

    def reset(self, start_step: int) -> None:
        self.start, self.images, self.clock = start_step, 0, time.perf_counter()
        self.losses.zero_()
        self.has_grad_norms = False

    def record(self, global_step: int, loss: torch.Tensor, images: int, grad_norm: torch.Tensor | None = None) -> None:
        self.losses[global_step - self.start] = loss  # a device copy: no sync
        if grad_norm is not None:
            self.grad_norms[global_step - self.start] = grad_norm
            self.has_grad_norms = True
        self.images += images

    def steps(self, global_step: int) -> int:
        return global_step - self.start

    def reduce(self, global_step: int, stop: StopRequest, data_ms: float = 0.0, checkpoint_due: bool = False) -> dict:
        """Across ranks, in one all-reduce: mean loss, first non-finite step (or None), whether any
        rank was signalled or found a checkpoint due (so that all save together), and each rank's
        mean wait for data (`data_ms`, this rank's)."""
        steps = self.steps(global_step)
        losses = self.losses[:steps]
        finite = torch.isfinite(losses)
        positions = torch.arange(steps, device=losses.device, dtype=torch.float64)
        first_bad = torch.where(finite, math.inf, positions).min() + self.start
        votes = torch.tensor([float(stop.requested), float(checkpoint_due)], device=losses.device, dtype=torch.float64)
        data_waits = torch.zeros(self.ctx.world_size, device=losses.device, dtype=torch.float64)
        data_waits[self.ctx.rank] = data_ms  # every other rank adds 0 here: the sum is each rank's own
        counts = torch.stack([losses.nan_to_num(0.0, 0.0, 0.0).double().sum(), (~finite).double().sum()])
        sums = torch.cat([counts, votes, data_waits])
        all_reduce_sum(sums, self.ctx)
        if self.ctx.distributed:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
        loss_sum, nonfinite, stop_votes, checkpoint_votes, *data_ms_by_rank = sums.tolist()  # the host sync point
        seconds = time.perf_counter() - self.clock
        grad_norm = None
        if self.has_grad_norms:
            # The same on every rank (DDP averages the gradients): rank 0's, no all-reduce. Steps a
            # float16 GradScaler skipped (an infinite norm) are left out, as their updates were.
            norms = self.grad_norms[:steps]
            finite = norms[torch.isfinite(norms)]
            grad_norm = (finite.mean().item(), finite.max().item()) if len(finite) else None
        return {
            "grad_norm": grad_norm,
            "data_ms_by_rank": data_ms_by_rank,
            "loss": loss_sum / (steps * self.ctx.world_size),  # mean over the window's steps and the ranks
            "first_nonfinite_step": int(first_bad.item()) if nonfinite else None,
            "stop": stop_votes > 0,
            "checkpoint_due": checkpoint_votes > 0,
            "images_per_s": self.images / max(seconds, 1e-9),  # all ranks together
            "step_ms": 1000.0 * seconds / max(steps, 1),
            # This rank's peak since the start: what decides whether a larger batch or image fits.
            "gpu_memory_gib": torch.cuda.max_memory_allocated(self.ctx.device) / 2**30
            if self.ctx.device.type == "cuda"
            else None,
        }


def log_train(
    log: SilentLog,
    epoch: int,
    position: dict,
    steps_per_epoch: int,
    window: dict,
    phases: dict,
    sync_ms: float,
    lr: float,
) -> None:
    """The console line and the scalars (TensorBoard, metrics.jsonl) of one reduced log window."""
    data_ms_by_rank = window["data_ms_by_rank"]
    slowest = max(range(len(data_ms_by_rank)), key=data_ms_by_rank.__getitem__)
    # A rank that waits for data far longer than rank 0 (a node with a slow disk or too few cores)
    # holds every rank back at the gradient all-reduce: named here, or it would show only as `sync`.
    slowest_text = f" (max {data_ms_by_rank[slowest]:.1f} on rank {slowest})" if len(data_ms_by_rank) > 1 else ""
    log.line(
        f"epoch {epoch} step {position['step_in_epoch']}/{steps_per_epoch} | loss {window['loss']:.4f} | "
        f"data {phases['data']:.1f}{slowest_text} fwd {phases['forward']:.1f} bwd {phases['backward']:.1f} "
        f"sync {sync_ms:.1f} opt {phases['optimizer']:.1f} ms | lr {lr:.4g} | {window['images_per_s']:.0f} img/s"
        + (f" | grad norm {window['grad_norm'][0]:.3g}" if window["grad_norm"] is not None else "")
        + (f" | peak mem {window['gpu_memory_gib']:.1f} GiB" if window["gpu_memory_gib"] is not None else "")
    )

    def fraction(data_ms: float) -> float:
        return min(1.0, data_ms / max(window["step_ms"], 1e-9))

    scalars = {
        "train/loss": window["loss"],
        "train/lr": lr,
        "train/images_per_s": window["images_per_s"],
        "train/data_time_fraction": fraction(phases["data"]),  # rank 0's
        "epoch": epoch,
    }
    if len(data_ms_by_rank) > 1:
        scalars["train/data_time_fraction_max"] = fraction(data_ms_by_rank[slowest])
        scalars["train/data_slowest_rank"] = slowest
    if window["grad_norm"] is not None:
        scalars["train/grad_norm"], scalars["train/grad_norm_max"] = window["grad_norm"]
    if window["gpu_memory_gib"] is not None:
        scalars["train/gpu_memory_gib"] = window["gpu_memory_gib"]  # rank 0's
    log.scalars(position["global_step"], scalars)


def log_epoch_time(
    log: SilentLog, epoch: int, seconds: float, steps_trained: int, steps_per_epoch: int, epochs: int
) -> None:
    """How long the epoch took (training, evaluation, checkpoints) and, at its pace, what is left."""
    epochs_left = epochs - epoch - 1
    text = f"epoch {epoch} took {duration(seconds)}"
    if epochs_left and steps_trained:  # an epoch resumed at its end trained no step: no pace to tell
        # Per step trained, so that an epoch resumed midway does not understate the pace.
        left_s = seconds / steps_trained * steps_per_epoch * epochs_left
        text += f"; about {duration(left_s)} left for {epochs_left} epoch(s) at this pace"
    log.line(text)


def duration(seconds: float) -> str:
    """`1d 02h 03m`, `2h 05m` or `4m 07s`."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"
