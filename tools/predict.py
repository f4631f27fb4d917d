"""Top-5 classes of images, from a training checkpoint, scored as its run evaluated them.

python -m tools.predict --checkpoint runs/resnet18/best.pt photo1.jpg photo2.jpg
python -m tools.predict --checkpoint runs/resnet18/best.pt --checkpoint runs/resnet50/best.pt photo.jpg

Several `--checkpoint`s predict as one ensemble (the mean of their softmax probabilities), as
`train.evaluate` scores them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from PIL import Image

from pipeline.transforms import torchvision_val_transform
from train.checkpoint import CheckpointError, check_same_classes, load_checkpoint, load_weights, saved_num_classes
from train.config import ConfigError
from train.evaluate import Ensemble, model_from_checkpoint
from train.val_settings import add_val_setting_flags, val_settings

TOP_K = 5


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, image: torch.Tensor, flip: bool) -> torch.Tensor:
    """Softmax over the classes for one transformed image, scored as the run evaluated it (with
    `flip`, from the mean of its and its mirror's outputs: logits, or an ensemble's log-probabilities)."""
    batch = image[None]
    logits = model(batch)
    if flip:
        logits = (logits + model(batch.flip(3))) / 2
    return logits.softmax(dim=1)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="the checkpoint to predict with; given more than once, an ensemble of them",
    )
    add_val_setting_flags(p)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true", help="use the EMA weights (a run with optim.ema_decay)")
    weights.add_argument(
        "--weights", help="use these weights instead (tools.export_weights or tools.average_checkpoints')"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line per image instead (image, top5 class indices, top5_wnids, top5_names, top5_probs)",
    )
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    if args.weights and len(args.checkpoint) > 1:
        p.error("--weights replaces one checkpoint's weights: not with several --checkpoint")
    paths = args.checkpoint
    try:
        checkpoints = [load_checkpoint(path) for path in paths]
        classes = checkpoints[0].get("classes") or []
        for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):  # output i: one class for all
            check_same_classes(checkpoint, path, saved_num_classes(checkpoints[0]), [w for w, _ in classes], paths[0])
        models = [model_from_checkpoint(checkpoint, args.ema).eval() for checkpoint in checkpoints]
        if args.weights:
            load_weights(models[0], args.weights, "--weights")
        settings = val_settings(args, checkpoints, paths)
    except CheckpointError as err:
        print(f"predict: checkpoint error: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"predict: error: {err}", file=sys.stderr)
        return 2
    model = models[0] if len(models) == 1 else Ensemble(models, [None] * len(models))
    transform = torchvision_val_transform(settings.image_size, settings.crop_pct, settings.interpolation)
    status = 0
    for path in args.images:
        try:
            image = Image.open(path).convert("RGB")
        except Exception as err:  # PIL raises many types for bad files
            print(f"{path}: cannot read image ({err})", file=sys.stderr)
            status = 1
            continue
        probabilities = class_probabilities(model, transform(image), settings.flip)
        top = probabilities.topk(min(TOP_K, len(probabilities)))
        indices, probs = top.indices.tolist(), top.values.tolist()
        names = [classes[i] if i < len(classes) else (str(i), "") for i in indices]  # [wnid, name]
        if args.json:
            row = {
                "image": path,
                "top5": indices,
                "top5_wnids": [wnid for wnid, _ in names],
                "top5_names": [name or wnid for wnid, name in names],
                "top5_probs": probs,
            }
            print(json.dumps(row))
            continue
        print(path)
        for probability, (wnid, name) in zip(probs, names, strict=True):
            print(f"  {probability:6.1%}  {name or wnid}  ({wnid})")
    return status


if __name__ == "__main__":
    sys.exit(main())
