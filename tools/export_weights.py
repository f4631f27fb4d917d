"""A training checkpoint's weights alone, as a plain state_dict for torchvision's model builder.

    python -m tools.export_weights --checkpoint runs/resnet50/best.pt --out resnet50.pth [--ema] [--hash-name]

The file holds what `torchvision.models.get_model(name, num_classes=N).load_state_dict(...)` takes
(the exact call is printed; a run with model.blurpool needs `train.model.build_model(..., blurpool=True)`,
as torchvision has no BlurPool): the model's or, with --ema, the EMA's tensors in the standard memory
format, without optimizer state or the EMA's step counter. With --hash-name the file is named
`<stem>-<first 8 hex digits of its SHA-256><suffix>`, the name `torch.hub.load_state_dict_from_url(...,
check_hash=True)` verifies, as torchvision's published weights are named. Written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch

from train.checkpoint import CheckpointError, load_checkpoint, save_atomically, saved_num_classes
from train.evaluate import model_from_checkpoint
from train.model import FIXED_SIZE_KEYWORDS, architecture_options

HASH_DIGITS = 8  # torchvision's weight files: resnet50-0676ba61.pth
HASH_NAME_HELP = "append the first 8 hex digits of the file's SHA-256 to its name (torch.hub's check_hash)"


def portable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with every tensor contiguous: channels_last strides would otherwise
    follow the weights into the user's model."""
    return {key: tensor.contiguous() for key, tensor in model.state_dict().items()}


def builder_call(checkpoint: dict) -> str:
    """The Python expression that builds the model these weights load into."""
    config = checkpoint["config"]
    name, num_classes, size = config["model"]["name"], saved_num_classes(checkpoint), config["resolution"]["val"]
    if config["model"].get("blurpool", False):
        size_argument = f", image_size={size}" if name in FIXED_SIZE_KEYWORDS else ""
        return f"train.model.build_model({name!r}, {num_classes}, blurpool=True{size_argument})"
    options = {"num_classes": num_classes, **architecture_options(name, size)}
    return f"torchvision.models.get_model({name!r}{''.join(f', {k}={v!r}' for k, v in options.items())})"


def write_weights(model: torch.nn.Module, checkpoint: dict, out: Path, hash_name: bool, what: str) -> Path:
    """Write `model`'s weights to `out` (renamed with its hash with `hash_name`), say what was written
    (`what`) and how to load it; returns the final path. Raises CheckpointError if it cannot."""
    state = portable_state(model)
    save_atomically(out, state)
    with open(out, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    if hash_name:
        named = out.with_name(f"{out.stem}-{sha256[:HASH_DIGITS]}{out.suffix}")
        try:
            os.replace(out, named)
        except OSError as err:
            raise CheckpointError(f"cannot rename {out} to {named} ({err.strerror or err})") from err
        out = named
    print(f"wrote {out}: {what}, {len(state)} tensors, sha256 {sha256}")
    print(f"load with: {builder_call(checkpoint)}.load_state_dict(torch.load({str(out)!r}))")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `python -m train` (last.pt, best.pt, ...)")
    p.add_argument("--out", required=True, type=Path, help="the state_dict file to write")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (a run with optim.ema_decay)")
    p.add_argument("--hash-name", action="store_true", help=HASH_NAME_HELP)
    args = p.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, args.ema)  # the weights must fit the model they describe
        weights = "EMA weights" if args.ema else "weights"
        what = f"{weights} at epoch {checkpoint['epoch']} step {checkpoint['step_in_epoch']}"
        write_weights(model, checkpoint, args.out, args.hash_name, what)
    except CheckpointError as err:
        print(f"export_weights: checkpoint error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
