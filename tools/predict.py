"""Top-5 classes of images, from a training checkpoint, scored as its run evaluated them.

python -m tools.predict --checkpoint runs/resnet18/best.pt photo1.jpg photo2.jpg
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

from pipeline.transforms import torchvision_val_transform
from train.checkpoint import CheckpointError, load_checkpoint, load_weights, trained_interpolation
from train.evaluate import model_from_checkpoint

TOP_K = 5


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, image: torch.Tensor, flip: bool) -> torch.Tensor:
    """Softmax over the classes for one transformed image, scored as the run evaluated it (with
    `flip`, from the mean of its and its mirror's logits)."""
    batch = image[None]
    logits = model(batch)
    if flip:
        logits = (logits + model(batch.flip(3))) / 2
    return logits.softmax(dim=1)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true", help="use the EMA weights (a run with optim.ema_decay)")
    weights.add_argument(
        "--weights", help="use these weights instead (tools.export_weights or tools.average_checkpoints')"
    )
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(checkpoint, args.ema).eval()
        if args.weights:
            load_weights(model, args.weights, "--weights")
    except CheckpointError as err:
        print(f"predict: checkpoint error: {err}", file=sys.stderr)
        return 2
    config = checkpoint["config"]
    transform = torchvision_val_transform(
        config["resolution"]["val"], config["data"]["crop_pct"], trained_interpolation(checkpoint)
    )
    classes = checkpoint.get("classes") or []
    status = 0
    for path in args.images:
        try:
            image = Image.open(path).convert("RGB")
        except Exception as err:  # PIL raises many types for bad files
            print(f"{path}: cannot read image ({err})", file=sys.stderr)
            status = 1
            continue
        probabilities = class_probabilities(model, transform(image), config["eval"].get("flip", False))
        top = probabilities.topk(min(TOP_K, len(probabilities)))
        print(path)
        for probability, index in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            wnid, name = classes[index] if index < len(classes) else (str(index), "")
            print(f"  {probability:6.1%}  {name or wnid}  ({wnid})")
    return status


if __name__ == "__main__":
    sys.exit(main())
