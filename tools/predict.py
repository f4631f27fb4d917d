"""Top-5 classes of images, from a training checkpoint, scored as its run evaluated them.

python -m tools.predict --checkpoint runs/resnet18/best.pt photo1.jpg photo2.jpg
python -m tools.predict --checkpoint runs/resnet18/best.pt --checkpoint runs/resnet50/best.pt photo.jpg
python -m tools.predict --checkpoint runs/resnet18/best.pt --json --batch-size 256 --workers 8 photos/ > top5.jsonl

Several `--checkpoint`s predict as one ensemble (the mean of their softmax probabilities), as
`train.evaluate` scores them. Images are read and transformed by DataLoader workers and scored in
batches, on the GPU when there is one; the output keeps the order of the arguments (a folder's
files in sorted order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from pipeline.transforms import to_training_layout, torchvision_val_transform
from shards.image_check import rgb_image
from shards.inputs import utf8_name
from train.checkpoint import CheckpointError, check_same_classes, load_checkpoint, load_weights, saved_num_classes
from train.config import ConfigError
from train.evaluate import Ensemble, model_from_checkpoint
from train.metrics import val_logits
from train.step import AUTOCAST_DTYPES, set_cuda_numerics
from train.val_settings import add_val_setting_flags, val_settings

TOP_K = 5


class ImageFiles(torch.utils.data.Dataset):
    """The images at `paths`, each transformed; an image that cannot be read gives the reason
    instead (a string), so that one bad file is reported in its place and the rest still scored."""

    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        path = self.paths[index]
        if os.path.exists(path) and not os.path.isfile(path):  # a pipe would block the reader
            return "not a regular file"
        try:
            with Image.open(path) as image:
                return self.transform(rgb_image(image))
        except Exception as err:  # PIL raises many types for bad files
            return f"cannot read image ({err})"


@torch.no_grad()
def class_probabilities(
    model: torch.nn.Module, images: torch.Tensor, flip: bool, device: torch.device, precision: str
) -> torch.Tensor:
    """Softmax over the classes for a batch of transformed images (N x C, float32 on the CPU), scored
    as the run evaluated them (`train.metrics.val_logits`: with `flip`, from the mean of each image's
    and its mirror's outputs: logits, or an ensemble's log-probabilities)."""
    images = to_training_layout(images, device, torch.float32)
    return val_logits(model, images, flip, device, precision).float().softmax(dim=1).cpu()


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
    p.add_argument(
        "--device", default=None, help="where to score, e.g. cpu or cuda:1 (default: the first GPU if there is one)"
    )
    p.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="bfloat16", help="on GPU; CPU uses float32")
    p.add_argument("--batch-size", type=int, default=64, help="images scored together")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader processes reading the images (0: this one; default: 4, or as many as there are cores)",
    )
    p.add_argument("images", nargs="+", help="image files, or folders: every file under one, in sorted order")
    args = p.parse_args(argv)
    images = image_files(args.images)
    if isinstance(images, str):
        p.error(images)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    device = scoring_device(args.device)
    if isinstance(device, str):
        p.error(device)
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
    precision = args.precision if device.type == "cuda" else "float32"
    set_cuda_numerics(device, precision)
    model = models[0] if len(models) == 1 else Ensemble(models, [None] * len(models))
    model = model.to(device)
    transform = torchvision_val_transform(settings.image_size, settings.crop_pct, settings.interpolation)
    # One batch is read here: worker processes would only add their start-up time.
    workers = args.workers if len(images) > args.batch_size else 0
    batches = torch.utils.data.DataLoader(
        ImageFiles(images, transform), batch_size=args.batch_size, num_workers=workers, collate_fn=list
    )
    status = 0
    for first, batch in zip(range(0, len(images), args.batch_size), batches, strict=True):
        readable = [image for image in batch if isinstance(image, torch.Tensor)]
        if readable:
            probabilities = iter(class_probabilities(model, torch.stack(readable), settings.flip, device, precision))
        for path, image in zip(images[first : first + len(batch)], batch, strict=True):
            shown = utf8_name(path)  # a name that is not UTF-8 as the converter records it, printable anywhere
            if isinstance(image, str):
                print(f"{shown}: {image}", file=sys.stderr)
                status = 1
            else:
                print_top(shown, next(probabilities), classes, args.json)
    return status


def image_files(arguments: list[str]) -> list[str] | str:
    """The files to predict: each argument, or for a folder every file under it (sorted; hidden ones
    left out), or why there are none. Files that are not images, links to nothing included, are
    reported when read, not skipped."""
    files = []
    for argument in arguments:
        folder = Path(argument)
        if not folder.is_dir():
            files.append(argument)
            continue
        found = sorted(
            path
            for path in folder.rglob("*")
            if not path.is_dir() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        )
        if not found:
            return f"{argument}: a folder without files"
        files += [str(path) for path in found]
    return files


def scoring_device(name: str | None) -> torch.device | str:
    """The device `--device` names (none: the first GPU, else the CPU), or why it cannot be used."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r}: not a device name (cpu, cuda, cuda:1)"
    gpus = torch.cuda.device_count()
    if device.type == "cpu" or (device.type == "cuda" and (device.index or 0) < gpus):
        return device
    if device.type != "cuda":
        return f"--device {name!r}: only cpu and cuda devices are supported"
    return f"--device {name!r}: this machine has {gpus} CUDA device(s)" + (
        f" (cuda:0 to cuda:{gpus - 1})" if gpus else "; use --device cpu"
    )


def print_top(path: str, probabilities: torch.Tensor, classes: list, as_json: bool) -> None:
    """The image's top five classes: a line of JSON, or the path and a line per class."""
    top = probabilities.topk(min(TOP_K, len(probabilities)))
    indices, probs = top.indices.tolist(), top.values.tolist()
    names = [classes[i] if i < len(classes) else (str(i), "") for i in indices]  # [wnid, name]
    if as_json:
        row = {
            "image": path,
            "top5": indices,
            "top5_wnids": [wnid for wnid, _ in names],
            "top5_names": [name or wnid for wnid, name in names],
            "top5_probs": probs,
        }
        print(json.dumps(row), flush=True)
        return
    print(path)
    for probability, (wnid, name) in zip(probs, names, strict=True):
        print(f"  {probability:6.1%}  {name or wnid}  ({wnid})")


if __name__ == "__main__":
    sys.exit(main())
