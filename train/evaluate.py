"""Evaluate a checkpoint on the val split: exact top-1/top-5 and loss, for any number of processes.

python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards
torchrun --nproc-per-node 8 -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards
python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-r-shards --class-subset
python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards --real-labels real.json

The val split of any shards whose classes are the model's (ImageNetV2, ImageNet-Sketch) scores as
it is; shards of some of its classes (ImageNet-A, ImageNet-R) with `--class-subset`. `--real-labels`
adds ImageNet-ReaL's top-1/top-5 on ImageNet's own val images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

from pipeline.errors import SampleDecodeError, data_error_message
from pipeline.loader import BACKENDS, LoaderConfig, create_loader
from pipeline.shard_set import ShardError
from shards.classes import imagenet_names
from shards.inputs import list_class_folders
from shards.manifest import manifest_digest, read_manifest
from train.checkpoint import (
    CheckpointError,
    check_same_classes,
    load_checkpoint,
    load_weights,
    saved_num_classes,
    trained_interpolation,
)
from train.config import ConfigError
from train.distributed import fail_together, require_agreement, setup_distributed, teardown_distributed
from train.metrics import NO_LABEL, evaluate
from train.model import FIXED_SIZE_KEYWORDS, build_model
from train.run_log import software_facts
from train.step import AUTOCAST_DTYPES, set_cuda_numerics
from train.trainer import EXIT_CONFIG, EXIT_DATA

REAL_IMAGES = 50_000  # ImageNet's val images, which ImageNet-ReaL relabelled
REAL_KEY = re.compile(r"ILSVRC2012_val_(\d{8})")


def checkpoint_weights(checkpoint: dict, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of the checkpoint's model, or of its EMA (without AveragedModel's step counter)."""
    if not use_ema:
        return checkpoint["model"]
    if not checkpoint.get("ema"):
        raise CheckpointError("checkpoint has no EMA weights (optim.ema_decay was 0)")
    return {k.removeprefix("module."): v for k, v in checkpoint["ema"].items() if k.startswith("module.")}


def model_from_checkpoint(checkpoint: dict, use_ema: bool = False) -> torch.nn.Module:
    """Rebuild the checkpoint's model (name and class count from its own record) with its weights."""
    config = checkpoint["config"]
    state = checkpoint_weights(checkpoint, use_ema)
    model = build_model(
        config["model"]["name"],
        saved_num_classes(checkpoint),
        blurpool=config["model"].get("blurpool", False),
        image_size=config["resolution"]["val"],
    )
    model.load_state_dict(state)
    return model


def check_classes_match(checkpoint: dict, path: str, num_classes: int, wnids: list[str], data: str) -> None:
    """`check_same_classes`, naming `--class-subset` where the shards hold some of the model's classes."""
    try:
        check_same_classes(checkpoint, path, num_classes, wnids, data)
    except CheckpointError as err:
        saved = {wnid for wnid, _ in checkpoint.get("classes") or []}
        if wnids and set(wnids) <= saved:
            raise CheckpointError(
                f"{err}; all {len(wnids)} classes of {data} are among the model's {len(saved)}: --class-subset "
                "predicts among them only (as ImageNet-A and ImageNet-R are scored)"
            ) from err
        raise


def class_columns(checkpoint: dict, path: str, wnids: list[str], data: str) -> torch.Tensor:
    """For each label of `data`, the model output of the same wnid (`--class-subset`)."""
    saved = [wnid for wnid, _ in checkpoint.get("classes") or []]
    if not saved:
        raise CheckpointError(
            f"{path}: records no class wnids (a run on synthetic data), so --class-subset cannot match"
        )
    output_of = {wnid: i for i, wnid in enumerate(saved)}
    unknown = [wnid for wnid in wnids if wnid not in output_of]
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} of the {len(wnids)} classes of {data} are not among the model's {len(saved)}, "
            f"e.g. {unknown[:5]}"
        )
    return torch.tensor([output_of[wnid] for wnid in wnids])


def check_imagenet_classes(checkpoint: dict, path: str) -> None:
    """ReaL's labels are indices of ImageNet-1k's classes in sorted wnid order: the model's must be those."""
    saved = [wnid for wnid, _ in checkpoint.get("classes") or []]
    imagenet = sorted(imagenet_names())
    if saved != imagenet:
        if len(saved) != len(imagenet):
            found = f"{len(saved)} classes recorded" if saved else "no class wnids recorded (a run on synthetic data)"
        else:
            first = next(i for i, (a, b) in enumerate(zip(saved, imagenet, strict=True)) if a != b)
            found = f"its class {first} is {saved[first]}, ImageNet's is {imagenet[first]}"
        raise ConfigError(
            f"--real-labels: ReaL labels ImageNet-1k's 1000 classes in sorted wnid order, and {path} has {found}"
        )


def real_label_sets(path: str, loader, data: str) -> torch.Tensor:
    """ImageNet-ReaL's label set of each sample the loader yields on this rank, in its order, as
    `train.metrics.evaluate` takes them: a row of class indices per sample, filled with NO_LABEL.

    real.json lists the sets in the order of ImageNet's val file names (ILSVRC2012_val_00000001 is
    the first); a sample is matched by its key, the converter's name for it (the file name less
    its extension)."""
    try:
        sets = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--real-labels {path}: cannot be read as JSON ({err})") from err
    valid = (
        isinstance(sets, list)
        and len(sets) == REAL_IMAGES
        and all(
            isinstance(labels, list) and all(isinstance(c, int) and 0 <= c < 1000 for c in labels) for labels in sets
        )
    )
    if not valid:
        raise ConfigError(
            f"--real-labels {path}: not ReaL's real.json (a list of {REAL_IMAGES} lists of class indices 0-999)"
        )
    keys = loader.sample_keys()
    rows = torch.full((len(keys), max(len(labels) for labels in sets)), NO_LABEL, dtype=torch.int64)
    for row, key in enumerate(keys):
        match = REAL_KEY.fullmatch(key)
        if match is None or not 1 <= int(match[1]) <= REAL_IMAGES:
            raise ConfigError(
                f"--real-labels: sample {key} of {data} is not one of ImageNet's val images "
                f"(ILSVRC2012_val_00000001 to ILSVRC2012_val_{REAL_IMAGES:08d}), which ReaL labels"
            )
        labels = sets[int(match[1]) - 1]
        rows[row, : len(labels)] = torch.tensor(labels, dtype=torch.int64)
    return rows


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def checkpoint_identity(checkpoint: dict) -> tuple[int, int, str]:
    """Epoch, global step and a digest of the run's config: what tells two checkpoints apart cheaply."""
    config = json.dumps(checkpoint["config"], sort_keys=True, default=str).encode()
    return checkpoint["epoch"], checkpoint["global_step"], hashlib.sha256(config).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True, help="shard directory with a val split")
    p.add_argument("--backend", default=None, choices=[b for b in BACKENDS if b != "synthetic"],
                   help="default: dali-gpu with a GPU, else dali-cpu")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, help="center-crop size (default: the checkpoint's resolution.val)")
    p.add_argument(
        "--crop-pct",
        type=float,
        help="resize to image size / this, then crop (default: the checkpoint's data.crop_pct)",
    )
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="bfloat16", help="on GPU; CPU uses float32")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    weights.add_argument(
        "--weights", help="evaluate these weights instead (tools.export_weights or tools.average_checkpoints' file)"
    )
    flip_help = "also score each image mirrored, mean of the logits (default: the checkpoint's eval.flip)"
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help=flip_help)
    p.add_argument(
        "--class-subset",
        action="store_true",
        help="the shards hold some of the model's classes, matched by wnid in any order (ImageNet-A's and "
        "ImageNet-R's 200): predict among those classes only, as those test sets are scored",
    )
    p.add_argument(
        "--real-labels",
        metavar="FILE",
        help="ImageNet-ReaL's real.json (the reassessed labels of ImageNet's 50,000 val images, a list of class "
        "indices per image; timm ships it as timm/data/_info/imagenet_real_labels.json): also report ReaL top-1/top-5",
    )
    args = p.parse_args(argv)
    if args.real_labels and args.class_subset:
        p.error("--real-labels scores ImageNet's val images among all 1000 classes: not with --class-subset")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        p.error(f"--crop-pct must be in (0, 1], got {args.crop_pct}")

    ctx = setup_distributed()
    try:
        # per-rank setup: a file missing on one node stops every rank, none left waiting
        with fail_together(ctx, (CheckpointError, ConfigError, ShardError, SampleDecodeError, FileNotFoundError)):
            checkpoint = load_checkpoint(args.checkpoint)
            model = model_from_checkpoint(checkpoint, args.ema).to(ctx.device)
            if args.weights:
                load_weights(model, args.weights, "--weights")
            trained_size, model_name = checkpoint["config"]["resolution"]["val"], checkpoint["config"]["model"]["name"]
            if model_name in FIXED_SIZE_KEYWORDS and args.image_size not in (None, trained_size):
                raise ConfigError(f"--image-size {args.image_size}: {model_name} was built for {trained_size} px only")
            precision = args.precision if ctx.device.type == "cuda" else "float32"
            set_cuda_numerics(ctx.device, precision)
            cfg = LoaderConfig(
                backend=args.backend or ("dali-gpu" if ctx.device.type == "cuda" else "dali-cpu"),
                batch_size=args.batch_size,
                val_image_size=args.image_size or checkpoint["config"]["resolution"]["val"],
                crop_pct=args.crop_pct or checkpoint["config"]["data"]["crop_pct"],
                interpolation=trained_interpolation(checkpoint),
                workers=args.workers,
                dtype=precision,
            )
            try:
                loader = create_loader(args.shards, "val", cfg, ctx.rank, ctx.world_size, ctx.device)
            except ValueError as err:  # a setting that cannot work here (e.g. dali-gpu without a GPU)
                raise ConfigError(str(err)) from err
            if cfg.backend == "folder":
                wnids = list_class_folders(Path(args.shards) / "val")  # the folder loader's class order
            else:
                wnids = [c.wnid for c in read_manifest(args.shards).classes]
            if args.class_subset:
                columns = class_columns(checkpoint, args.checkpoint, wnids, args.shards).to(ctx.device)
            else:
                columns = None
                check_classes_match(checkpoint, args.checkpoint, loader.num_classes, wnids, args.shards)
            label_sets = None
            if args.real_labels:
                check_imagenet_classes(checkpoint, args.checkpoint)
                label_sets = real_label_sets(args.real_labels, loader, args.shards).to(ctx.device)
            flip = checkpoint["config"]["eval"].get("flip", False) if args.flip is None else args.flip
            facts = {
                "--backend": cfg.backend,
                "--batch-size": cfg.batch_size,
                "--image-size": cfg.val_image_size,
                "--crop-pct": cfg.crop_pct,
                "--precision": precision,
                "--ema": args.ema,
                "--weights": args.weights,
                "--flip": flip,
                "--class-subset": args.class_subset,
                "--real-labels sha256": file_digest(args.real_labels) if args.real_labels else None,
                "checkpoint (epoch, step, config digest)": checkpoint_identity(checkpoint),
                "val steps": loader.steps_per_epoch,
            }
            if cfg.backend != "folder":
                facts["data: manifest.json sha256"] = manifest_digest(args.shards)
            facts |= software_facts()
        # Each node reads its own --checkpoint and --shards: a mixture would be scored silently.
        advice = "every node must evaluate the same checkpoint on the same shards, with the same code and flags"
        require_agreement(facts, ctx, advice)
        metrics = evaluate(model, loader, ctx, precision, flip, columns, label_sets)
        loader.close()
        if ctx.is_main:
            settings = {"image_size": cfg.val_image_size, "crop_pct": cfg.crop_pct, "flip": flip}
            settings["classes"] = len(columns) if columns is not None else loader.num_classes  # predicted among
            print(json.dumps({"checkpoint": args.checkpoint, "weights": args.weights, **metrics, **settings}))
    except CheckpointError as err:
        print(f"evaluate: checkpoint error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except ConfigError as err:
        print(f"evaluate: error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except (ShardError, SampleDecodeError, FileNotFoundError) as err:
        print(f"evaluate: data error: {data_error_message(err)}", file=sys.stderr, flush=True)
        return EXIT_DATA
    finally:
        teardown_distributed(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
