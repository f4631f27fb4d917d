"""Evaluate a checkpoint on the val split: exact top-1/top-5 and loss, for any number of processes.

python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards
torchrun --nproc-per-node 8 -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards
python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-r-shards --class-subset
python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards --real-labels real.json
python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards --per-class classes.csv
python -m train.evaluate --checkpoint runs/resnet18/best.pt --shards /data/imagenet-shards --predictions val.jsonl
python -m train.evaluate --checkpoint runs/resnet18/best.pt --checkpoint runs/resnet50/best.pt --shards /data/imagenet

The val split of any shards whose classes are the model's (ImageNetV2, ImageNet-Sketch) scores as
it is; shards of some of its classes (ImageNet-A, ImageNet-R) with `--class-subset`. `--real-labels`
adds ImageNet-ReaL's top-1/top-5 on ImageNet's own val images. `--per-class` writes each class's
accuracy, loss and most frequent mistake to a CSV file, to find the classes a model gets wrong;
`--predictions` each image's top five classes and their probabilities. Several `--checkpoint`s are
scored as one ensemble: the mean of their softmax probabilities.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import torch

from pipeline.errors import SampleDecodeError, data_error_message
from pipeline.loader import BACKENDS, PAD_LABEL, LoaderConfig, create_loader
from pipeline.shard_set import ShardError
from shards.classes import build_class_list
from shards.inputs import list_class_folders
from shards.manifest import manifest_digest, read_manifest
from shards.tar_writer import write_atomically
from train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    saved_num_classes,
)
from train.config import ConfigError
from train.distributed import (
    DistContext,
    all_gather_objects,
    fail_together,
    require_agreement,
    setup_distributed,
    teardown_distributed,
)
from train.eval_labels import check_classes_match, check_imagenet_classes, class_columns, real_label_sets
from train.metrics import evaluate
from train.model import build_model
from train.run_log import software_facts
from train.step import AUTOCAST_DTYPES, set_cuda_numerics
from train.trainer import EXIT_CONFIG, EXIT_DATA
from train.val_settings import add_val_setting_flags, val_settings


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


class Ensemble(torch.nn.Module):
    """Several classifiers scored as one: its outputs are the log of the members' mean softmax
    probabilities, so top-k, loss and probabilities are the ensemble's. `columns[i]`: the outputs of
    member i to keep, in the order of the labels (`--class-subset`), or None for all of them."""

    def __init__(self, members: list[torch.nn.Module], columns: list[torch.Tensor | None]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.columns = columns

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = None
        for member, columns in zip(self.members, self.columns, strict=True):
            logits = member(images).float()
            if columns is not None:
                logits = logits.index_select(1, columns)
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
        # a probability that rounds to 0 would make the loss infinite: the smallest float instead
        return (total / len(self.members)).clamp_min(torch.finfo(torch.float32).tiny).log()


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def checkpoint_identity(checkpoint: dict) -> tuple[int, int, str]:
    """Epoch, global step and a digest of the run's config: what tells two checkpoints apart cheaply."""
    config = json.dumps(checkpoint["config"], sort_keys=True, default=str).encode()
    return checkpoint["epoch"], checkpoint["global_step"], hashlib.sha256(config).hexdigest()[:16]


PER_CLASS_COLUMNS = [
    "class", "wnid", "name", "samples", "top1_correct", "top5_correct", "acc1", "acc5", "loss",
    "mistaken_for", "mistaken_for_name", "mistaken_times",
]  # fmt: skip


def write_per_class(path: Path, rows: list[list], classes: list[tuple[str, str | None]]) -> None:
    """Write one CSV line per class of the shards (by label index): its samples, correct counts,
    top-1/top-5 accuracy (percent), mean loss, and the class its images were most often predicted
    as instead, with how many of them; a class without samples or mistakes has those fields empty.
    Written whole or not at all (a temporary file renamed)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(PER_CLASS_COLUMNS)
    for index, (row, (wnid, name)) in enumerate(zip(rows, classes, strict=True)):
        samples, correct1, correct5, loss_sum, mistaken_for, mistaken_times = row
        figures = ["", "", ""]
        if samples:
            figures = [
                f"{100 * correct1 / samples:.4f}",
                f"{100 * correct5 / samples:.4f}",
                f"{loss_sum / samples:.6f}",
            ]
        mistake = ["", "", ""]
        if mistaken_for is not None:
            mistake = [classes[mistaken_for][0], classes[mistaken_for][1] or "", mistaken_times]
        writer.writerow([index, wnid, name or "", int(samples), int(correct1), int(correct5), *figures, *mistake])
    write_atomically(path, text.getvalue().encode())


def gather_predictions(keys: list[str], predictions: tuple[torch.Tensor, ...], ctx: DistContext) -> list[tuple]:
    """Every rank's (key, label, top-5 classes, top-5 probabilities) of its real samples (padding
    left out), gathered on every rank and sorted by key: the same list for any number of ranks."""
    labels, classes, probabilities = predictions
    if len(keys) != len(labels):
        raise RuntimeError(f"the loader named {len(keys)} samples but yielded {len(labels)}")
    rows = [
        (key, label, top, probs)
        for key, label, top, probs in zip(keys, labels.tolist(), classes.tolist(), probabilities.tolist(), strict=True)
        if label != PAD_LABEL
    ]
    return sorted(row for part in all_gather_objects(rows, ctx) for row in part)


def write_predictions(path: Path, rows: list[tuple], classes: list[tuple[str, str | None]]) -> None:
    """One JSON line per sample, by key: its label, and the five classes the model scored highest
    with their probabilities (softmax; over the shards' classes with --class-subset). Written whole
    or not at all."""
    lines = []
    for key, label, top, probs in rows:
        record = {
            "key": key,
            "label": label,
            "wnid": classes[label][0],
            "top5": top,
            "top5_wnids": [classes[c][0] for c in top],
            "top5_probs": [round(p, 6) for p in probs],
        }
        lines.append(json.dumps(record) + "\n")
    write_atomically(path, "".join(lines).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="the checkpoint to score; given more than once, an ensemble of them (the mean of their probabilities)",
    )
    p.add_argument("--shards", required=True, help="shard directory with a val split")
    p.add_argument("--backend", default=None, choices=[b for b in BACKENDS if b != "synthetic"],
                   help="default: dali-gpu with a GPU, else dali-cpu")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=256)
    add_val_setting_flags(p)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="bfloat16", help="on GPU; CPU uses float32")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    weights.add_argument(
        "--weights", help="evaluate these weights instead (tools.export_weights or tools.average_checkpoints' file)"
    )
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
    p.add_argument(
        "--per-class",
        metavar="FILE",
        type=Path,
        help="also write each class's samples, top-1/top-5 accuracy, mean loss and the class it is most often "
        "mistaken for to this CSV file (one line per class of the shards, by label index)",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        type=Path,
        help="also write each val sample's top-5 classes and probabilities to this file, one JSON line per "
        "sample by key (for error analysis)",
    )
    args = p.parse_args(argv)
    for option, path in (("--per-class", args.per_class), ("--predictions", args.predictions)):
        if path is not None and not path.parent.is_dir():
            p.error(f"{option} {path}: no directory {path.parent} to write it in")
        if path is not None and path.is_dir():  # found before the evaluation, not after it
            p.error(f"{option} {path}: is a folder; give a file name")
    if args.per_class is not None and args.per_class.resolve() == (args.predictions or Path()).resolve():
        p.error(f"--per-class and --predictions name the same file, {args.per_class}: one would replace the other")
    if args.real_labels and args.class_subset:
        p.error("--real-labels scores ImageNet's val images among all 1000 classes: not with --class-subset")
    if args.weights and len(args.checkpoint) > 1:
        p.error("--weights replaces one checkpoint's weights: not with several --checkpoint")

    ctx = setup_distributed()
    try:
        # per-rank setup: a file missing on one node stops every rank, none left waiting
        with fail_together(ctx, (CheckpointError, ConfigError, ShardError, SampleDecodeError, FileNotFoundError)):
            paths = args.checkpoint
            checkpoints = [load_checkpoint(path) for path in paths]
            models = [model_from_checkpoint(checkpoint, args.ema).to(ctx.device) for checkpoint in checkpoints]
            if args.weights:
                load_weights(models[0], args.weights, "--weights")
            settings = val_settings(args, checkpoints, paths)
            precision = args.precision if ctx.device.type == "cuda" else "float32"
            set_cuda_numerics(ctx.device, precision)
            cfg = LoaderConfig(
                backend=args.backend or ("dali-gpu" if ctx.device.type == "cuda" else "dali-cpu"),
                batch_size=args.batch_size,
                val_image_size=settings.image_size,
                crop_pct=settings.crop_pct,
                interpolation=settings.interpolation,
                workers=args.workers,
                dtype=precision,
            )
            try:
                loader = create_loader(args.shards, "val", cfg, ctx.rank, ctx.world_size, ctx.device)
            except ValueError as err:  # a setting that cannot work here (e.g. dali-gpu without a GPU)
                raise ConfigError(str(err)) from err
            if cfg.backend == "folder":
                classes = build_class_list(list_class_folders(Path(args.shards) / "val"))  # the folder loader's order
            else:
                classes = read_manifest(args.shards).classes
            wnids = [c.wnid for c in classes]
            member_columns = []
            for path, checkpoint in zip(paths, checkpoints, strict=True):
                if args.class_subset:
                    member_columns.append(class_columns(checkpoint, path, wnids, args.shards).to(ctx.device))
                else:
                    member_columns.append(None)
                    check_classes_match(checkpoint, path, loader.num_classes, wnids, args.shards)
                if args.real_labels:
                    check_imagenet_classes(checkpoint, path)
            label_sets = None
            if args.real_labels:
                label_sets = real_label_sets(args.real_labels, loader, args.shards).to(ctx.device)
            if len(models) == 1:  # its own logits, as the trainer's evaluation scores them
                model, columns = models[0], member_columns[0]
            else:
                model, columns = Ensemble(models, member_columns), None
            flip = settings.flip
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
                "--interpolation": cfg.interpolation,
                "checkpoints (epoch, step, config digest)": [checkpoint_identity(c) for c in checkpoints],
                "val steps": loader.steps_per_epoch,
            }
            if cfg.backend != "folder":
                facts["data: manifest.json sha256"] = manifest_digest(args.shards)
            facts |= software_facts()
        # Each node reads its own --checkpoint and --shards: a mixture would be scored silently.
        advice = "every node must evaluate the same checkpoint on the same shards, with the same code and flags"
        require_agreement(facts, ctx, advice)
        per_class = len(wnids) if args.per_class is not None else 0
        want_predictions = args.predictions is not None
        metrics = evaluate(model, loader, ctx, precision, flip, columns, label_sets, per_class, want_predictions)
        predictions = None
        if want_predictions:  # every rank takes part in the gather
            predictions = gather_predictions(loader.sample_keys(), metrics.pop("predictions"), ctx)
            if len(predictions) != metrics["samples"]:
                raise RuntimeError(f"{len(predictions)} predictions for {metrics['samples']} samples")
        loader.close()
        if ctx.is_main:
            names = [(c.wnid, c.name) for c in classes]
            outputs = [  # (JSON key and option, file, writer, what it writes)
                ("per_class", args.per_class, write_per_class, metrics.pop("per_class", None)),
                ("predictions", args.predictions, write_predictions, predictions),
            ]
            write_errors = []
            for key, path, write, rows in outputs:
                if rows is None:
                    continue
                try:
                    write(path, rows, names)
                    metrics[key] = str(path)
                except OSError as err:  # the scores are still printed: the evaluation is not lost
                    write_errors.append(f"cannot write --{key.replace('_', '-')} {path} ({err.strerror or err})")
            scored_with = {"image_size": cfg.val_image_size, "crop_pct": cfg.crop_pct, "flip": flip}
            scored_with["interpolation"] = cfg.interpolation
            scored_with["classes"] = len(columns) if columns is not None else loader.num_classes  # predicted among
            scored = paths[0] if len(paths) == 1 else paths  # an ensemble: the list of its checkpoints
            print(json.dumps({"checkpoint": scored, "weights": args.weights, **metrics, **scored_with}))
            for error in write_errors:
                print(f"evaluate: error: {error}", file=sys.stderr, flush=True)
            if write_errors:
                return EXIT_CONFIG
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
