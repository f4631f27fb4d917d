"""Learning rate per optimizer step and train image size per epoch."""

from __future__ import annotations

import math

from train.config import ResolutionConfig, ScheduleConfig


def learning_rate(step: int, steps_per_epoch: int, epochs: int, peak_lr: float, cfg: ScheduleConfig) -> float:
    """Warmup (a ramp from `warmup_lr`, or `warmup_lr` held), then cosine or linear decay to
    `min_lr`, or step decay.

    Computed per iteration (not per epoch), from the global step alone, so resuming needs no state.
    """
    epoch = step / steps_per_epoch
    total = epochs
    warmup = min(cfg.warmup_epochs, total)
    if in_warmup(step, steps_per_epoch, epochs, cfg):
        if cfg.warmup == "constant":
            return cfg.warmup_lr
        return cfg.warmup_lr + (peak_lr - cfg.warmup_lr) * epoch / warmup
    if cfg.kind == "step":
        return peak_lr * cfg.step_gamma ** int(epoch // cfg.step_every_epochs)
    progress = (epoch - warmup) / max(total - warmup, 1e-9)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.kind == "cosine":
        return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr + (peak_lr - cfg.min_lr) * (1 - progress)


def in_warmup(step: int, steps_per_epoch: int, epochs: int, cfg: ScheduleConfig) -> bool:
    """Whether optimizer step `step` (from 0) falls in the learning-rate warmup."""
    return step / steps_per_epoch < min(cfg.warmup_epochs, epochs)


def train_image_size(epoch: int, cfg: ResolutionConfig) -> int:
    """FFCV's progressive resizing: min until start_ramp, linear to max at end_ramp, multiples of `step`."""
    if epoch >= cfg.end_ramp:
        return cfg.max
    if epoch <= cfg.start_ramp:
        return cfg.min
    fraction = (epoch - cfg.start_ramp) / (cfg.end_ramp - cfg.start_ramp)
    return int(round((cfg.min + fraction * (cfg.max - cfg.min)) / cfg.step)) * cfg.step
