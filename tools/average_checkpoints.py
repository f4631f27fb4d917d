"""The mean of several checkpoints' weights, written as tools.export_weights writes one checkpoint's.

    python -m tools.average_checkpoints runs/mnv3/epoch-*.pt --best 3 --out mnv3-avg.pth [--ema] [--hash-name]
    python -m tools.average_checkpoints runs/rn50/best-epoch-*.pt --out rn50-avg.pth   # checkpoint.keep_best
    python -m train.evaluate --checkpoint runs/mnv3/last.pt --weights mnv3-avg.pth --shards /data/imagenet-shards

Averaging the weights of a run's last good checkpoints is how torchvision made its MobileNetV3
weights (the last three that improved top-1) and what timm's avg_checkpoints does (the best N by
the metric each checkpoint holds). With --best N only the N checkpoints with the highest val top-1
(the EMA's, with --ema) are averaged; without it, all those given. Every floating-point tensor,
parameters and BatchNorm statistics alike, is the mean over the checkpoints (summed in float64);
integer ones (BatchNorm's batch counters) are the latest checkpoint's. The checkpoints must hold the
same model (model.name, model.blurpool, class count), each a different training step.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.export_weights import HASH_NAME_HELP, write_weights
from train.checkpoint import CheckpointError, load_checkpoint, saved_num_classes
from train.evaluate import checkpoint_weights, model_from_checkpoint


@dataclass(frozen=True)
class Candidate:
    """What choosing and checking a checkpoint needs, without its weights."""

    path: Path
    epoch: int
    step: int  # global step: which checkpoint is latest
    step_in_epoch: int
    top1: float | None  # the val top-1 it was saved with (the EMA's with --ema); None if saved mid-epoch
    model: str  # name, BlurPool, class count: what must be the same in all
    classes: str  # the class list's digest: label i must mean one class in all

    def describe(self) -> str:
        top1 = "no val top-1" if self.top1 is None else f"top-1 {self.top1:g}"
        return f"{self.path} (epoch {self.epoch} step {self.step_in_epoch}, {top1})"


def read_candidate(path: Path, use_ema: bool) -> Candidate:
    checkpoint = load_checkpoint(path)
    checkpoint_weights(checkpoint, use_ema)  # a checkpoint without an EMA is named now
    model = checkpoint["config"]["model"]
    top1 = checkpoint.get("metrics", {}).get("ema_acc1" if use_ema else "acc1")
    blurpool = " with BlurPool" if model.get("blurpool", False) else ""
    identity = f"{model['name']}{blurpool}, {saved_num_classes(checkpoint)} classes"
    classes = hashlib.sha256(repr(checkpoint.get("classes")).encode()).hexdigest()
    position = checkpoint["epoch"], checkpoint["global_step"], checkpoint["step_in_epoch"]
    return Candidate(path, *position, top1, identity, classes)


def choose(candidates: list[Candidate], best: int | None) -> list[Candidate]:
    """The checkpoints to average, oldest first; raises CheckpointError naming what does not fit."""
    first = candidates[0]
    for other in candidates[1:]:
        if other.model != first.model:
            raise CheckpointError(f"{other.path} holds {other.model}; {first.path} holds {first.model}")
        if other.classes != first.classes:
            raise CheckpointError(f"{other.path} and {first.path} label other classes (another class list or order)")
    by_step = {}
    for candidate in candidates:
        if candidate.step in by_step:
            raise CheckpointError(
                f"{by_step[candidate.step].path} and {candidate.path} hold the same training step: give one of them"
            )
        by_step[candidate.step] = candidate
    if best is not None:
        if best > len(candidates):
            raise CheckpointError(f"--best {best}: only {len(candidates)} checkpoint(s) given")
        unscored = [str(c.path) for c in candidates if c.top1 is None]
        if unscored:
            raise CheckpointError(f"--best needs each checkpoint's val top-1; saved without one: {', '.join(unscored)}")
        candidates = sorted(candidates, key=lambda c: (c.top1, c.step), reverse=True)[:best]
    return sorted(candidates, key=lambda c: c.step)


def mean_weights(chosen: list[Candidate], use_ema: bool) -> dict[str, torch.Tensor]:
    """Floating-point tensors averaged over `chosen` (in float64, one checkpoint in memory at a
    time), integer tensors taken from the last of them."""
    sums: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for candidate in chosen:
        state = checkpoint_weights(load_checkpoint(candidate.path), use_ema)
        for key, tensor in state.items():
            if tensor.is_floating_point():
                sums[key] = sums[key] + tensor.double() if key in sums else tensor.double()
    return {
        key: (sums[key] / len(chosen)).to(tensor.dtype) if tensor.is_floating_point() else tensor
        for key, tensor in state.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.average_checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints of one run (e.g. epoch-*.pt)")
    p.add_argument("--out", required=True, type=Path, help="the state_dict file to write")
    p.add_argument("--best", type=int, help="average only the N with the highest val top-1")
    p.add_argument("--ema", action="store_true", help="average the EMA weights (a run with optim.ema_decay)")
    p.add_argument("--hash-name", action="store_true", help=HASH_NAME_HELP)
    args = p.parse_args(argv)
    if args.best is not None and args.best < 1:
        p.error(f"--best must be at least 1, got {args.best}")
    try:
        chosen = choose([read_candidate(path, args.ema) for path in args.checkpoints], args.best)
        for candidate in chosen:
            print(f"averaging {candidate.describe()}")
        latest = load_checkpoint(chosen[-1].path)
        model = model_from_checkpoint(latest, args.ema)
        model.load_state_dict(mean_weights(chosen, args.ema))
        weights = "EMA weights" if args.ema else "weights"
        write_weights(model, latest, args.out, args.hash_name, f"the mean of {len(chosen)} checkpoints' {weights}")
    except CheckpointError as err:
        print(f"average_checkpoints: checkpoint error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
