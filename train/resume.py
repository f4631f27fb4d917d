"""Where a resumed run goes on: the checkpoint's position in its epochs, mapped onto this run's
epoch length, and how the checkpoint's run split the epoch it stopped in, so that this run's
loaders read the rest of that epoch even when it splits the data otherwise."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.split import EarlierSplit
from train.config import Config


def start_position() -> dict:
    """Where a fresh run starts: epoch 0, step 0, no best epoch yet."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_acc1": -math.inf, "best_kept": []}


def saved_steps_per_epoch(checkpoint: dict) -> int | None:
    """Optimizer steps per epoch of the run that wrote `checkpoint`; None where that cannot be told.

    Checkpoints before 2026-12-07 do not record it; from epoch 1 on it follows from their position,
    whose global step counted every step of the epochs before."""
    if "steps_per_epoch" in checkpoint:
        return checkpoint["steps_per_epoch"]
    if checkpoint["epoch"] > 0:
        return (checkpoint["global_step"] - checkpoint["step_in_epoch"]) // checkpoint["epoch"]
    return None


def interrupted_split(checkpoint: dict) -> EarlierSplit:
    """How the run that wrote `checkpoint` split the epoch it stopped in: what a run resumed with
    another split needs to read the rest of that epoch (`pipeline.split.EarlierSplit`)."""
    config = checkpoint["config"]
    return EarlierSplit(
        world_size=checkpoint["world_size"],
        batch_size=config["data"]["batch_size"],
        batches_read=checkpoint["step_in_epoch"] * config["optim"].get("accumulate", 1),
        seed=config["train"]["seed"],
        repeats=config["data"].get("aug_repeats", 1),
    )


@dataclass
class ResumePoint:
    position: dict  # start_position()'s keys; step_in_epoch counts this run's steps
    earlier_split: EarlierSplit | None  # for `set_epoch(..., earlier=)`; None: read on as split now
    notes: list[str]  # what the mapping changed, for the run log


def resume_point(
    checkpoint: dict, cfg: Config, world_size: int, steps_per_epoch: int, shards_digest: str | None = None
) -> ResumePoint:
    """Where a run of `cfg` on `world_size` processes, with `steps_per_epoch` optimizer steps per
    epoch, goes on from `checkpoint`.

    Another number of processes, batch size or accumulation gives an epoch another number of steps:
    the run goes on at the same share of the epoch (rounded down), and the schedule with it. Unknown
    (epoch 0 of an older checkpoint): as now, unless its step shows the epoch was longer. Split as
    now and stopped at the same batch, the unbroken order goes on (`earlier_split` None); otherwise
    the loaders read the samples the checkpoint's run had not reached (`PartLoader.set_epoch`).
    `shards_digest`: this run's shards (`manifest_digest`), noted when they are another conversion."""
    position = {key: checkpoint[key] for key in ("epoch", "step_in_epoch", "global_step", "best_acc1")}
    position["best_kept"] = checkpoint.get("best_kept", [])  # checkpoints before 2026-12-07 lack it
    notes = []
    saved_steps = saved_steps_per_epoch(checkpoint) or max(steps_per_epoch, position["step_in_epoch"])
    earlier_split = interrupted_split(checkpoint) if position["step_in_epoch"] else None
    if saved_steps != steps_per_epoch and position["step_in_epoch"]:
        position["step_in_epoch"] = position["step_in_epoch"] * steps_per_epoch // saved_steps
        notes.append(
            f"an epoch had {saved_steps} steps in the checkpoint's run and has {steps_per_epoch} in this "
            f"one: epoch {position['epoch']} goes on at step {position['step_in_epoch']}, the same share of it"
        )
    unbroken = EarlierSplit(
        world_size,
        cfg.data.batch_size,
        position["step_in_epoch"] * cfg.optim.accumulate,
        cfg.train.seed,
        cfg.data.aug_repeats,
    )
    epoch_done = position["step_in_epoch"] == steps_per_epoch
    saved_digest = checkpoint.get("shards_digest")  # checkpoints before 2026-12-08 lack it
    if saved_digest and shards_digest and saved_digest != shards_digest:
        notes.append(
            f"note: data.shards holds another conversion than the checkpoint's run read (manifest.json sha256 "
            f"{shards_digest}, was {saved_digest})"
            + (
                f"; the rest of epoch {position['epoch']} follows the new shards' order, so it may read again "
                "samples read before the stop and miss others"
                if position["step_in_epoch"] and not epoch_done
                else ""
            )
        )
    if earlier_split == unbroken or epoch_done or cfg.data.backend == "synthetic":
        earlier_split = None
    return ResumePoint(position, earlier_split, notes)
