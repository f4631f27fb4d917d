"""Convert an ImageNet folder into globally shuffled webdataset tar shards with DALI index files.

    python -m tools.make_shards --train /data/imagenet/train --val /data/imagenet/val \
        --val-labels LOC_val_solution.csv --out /data/imagenet-shards
    python -m tools.make_shards --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \
        --val-labels ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet-shards
    python -m tools.make_shards --val imagenetv2-matched-frequency-format-val --class-index-folders \
        --out /data/imagenetv2-shards
    python -m tools.make_shards --train ILSVRC2012_img_train.tar --val ILSVRC2012_img_val.tar \
        --val-labels ILSVRC2012_devkit_t12.tar.gz --classes imagenet100.txt --only-listed-classes --out /data/in100

The second form reads image-net.org's three downloads as they are, without unpacking (shards/archives.py).
`--train-max-short-side 256` stores train images at most 256 px on the shorter side (FFCV, too,
stores ImageNet at a maximum resolution chosen at conversion): on the 1000 sample photographs, 31%
of the bytes and 43% of the pixels to decode. Val stays full size, for evaluation at 256 px and above.
`--train-raw-pixels` with such a limit stores the train images decoded (PPM pixels), so that reading
them decodes no JPEG, at several times the size (docs/shards.md). The third converts ImageNetV2,
whose folders are named by class index (0-999) rather than by wnid, for `train.evaluate`. The fourth
converts 100 of the classes, in the order of the file listing them, leaving the others out.

`--dry-run` scans the inputs and prints what a run would write (and what --out already holds)
without decoding or writing anything: label problems show in seconds, not after an hour.

Rerun the same command after a kill to resume. Exit status: 0 on success, 1 when --strict and
some input was rejected, 2 on bad arguments or an output made with other arguments, 3 on an I/O
error such as a full disk (complete shards are kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from shards.convert import (
    DEFAULT_QUALITY,
    DEFAULT_SHARD_SIZE_MB,
    ConvertOptions,
    OutputMismatchError,
    convert,
    dry_run,
    summary,
)
from shards.manifest import SPLITS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--train",
        metavar="DIR",
        help="training images, DIR/<wnid>/*.JPEG, or ILSVRC2012_img_train.tar itself (read in place)",
    )
    p.add_argument(
        "--val",
        metavar="DIR",
        help="validation images: DIR/<wnid>/*.JPEG, or flat with --val-labels (a folder, or ILSVRC2012_img_val.tar)",
    )
    p.add_argument(
        "--val-labels",
        metavar="FILE",
        help="labels of a flat --val: Kaggle LOC_val_solution.csv, 'filename wnid' lines, or image-net.org's "
        "devkit (ILSVRC2012_devkit_t12.tar.gz or its folder; needs scipy)",
    )
    p.add_argument(
        "--classes",
        metavar="FILE",
        help="class order, one wnid per line, optional name after a tab or space (Kaggle's LOC_synset_mapping.txt); "
        "default: sorted folders",
    )
    p.add_argument(
        "--class-index-folders",
        action="store_true",
        help="the class folders are named by class index (0, 1, ..., as ImageNetV2 ships them): folder i holds class "
        "i of --classes (default: ImageNet-1k's 1000 classes in sorted wnid order)",
    )
    p.add_argument(
        "--only-listed-classes",
        action="store_true",
        help="convert only the classes of --classes (e.g. ImageNet-100's list): class folders, class archives and "
        "val labels of other classes are left out instead of refused",
    )
    p.add_argument("--out", metavar="DIR", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global train shuffle (default: 0)")
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=DEFAULT_SHARD_SIZE_MB,
        help=f"close a shard once it reaches this size (default: {DEFAULT_SHARD_SIZE_MB})",
    )
    p.add_argument(
        "--max-short-side",
        type=int,
        metavar="S",
        help="shrink images whose shorter side exceeds S pixels to S and re-encode them (both splits)",
    )
    for split in SPLITS:
        p.add_argument(
            f"--{split}-max-short-side",
            type=int,
            metavar="S",
            help=f"the same for {split} only, in place of --max-short-side",
        )
    for split in SPLITS:
        p.add_argument(
            f"--{split}-raw-pixels",
            action="store_true",
            help=f"store {split} images decoded, as RGB pixels (PPM), so that reading them decodes no JPEG;"
            f" needs a {split} short-side limit"
            + (" (about 335 GB for ImageNet's train split at 256)" if split == "train" else ""),
        )
    p.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        help=f"JPEG quality of re-encoded images (default: {DEFAULT_QUALITY})",
    )
    p.add_argument("--strict", action="store_true", help="exit non-zero after the run if any input was rejected")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other arguments")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="scan the inputs and print what a run would convert and write (classes, images, shards, rejected "
        "files, what --out holds), decoding and writing nothing; label problems are reported as a run reports them",
    )
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if not math.isfinite(args.shard_size_mb) or args.shard_size_mb <= 0:  # nan, inf: one shard, NaN in the JSON
        p.error(f"--shard-size-mb must be positive (a finite number of MB), got {args.shard_size_mb}")
    if not 1 <= args.quality <= 100:
        p.error("--quality must be between 1 and 100")
    for option in ("max_short_side", *(f"{split}_max_short_side" for split in SPLITS)):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be at least 1")
    if not args.train and not args.val:
        p.error("give --train and/or --val")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: exists and is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = ConvertOptions(
        out=args.out,
        train=args.train,
        val=args.val,
        val_labels=args.val_labels,
        classes=args.classes,
        class_index_folders=args.class_index_folders,
        only_listed_classes=args.only_listed_classes,
        seed=args.seed,
        shard_size_mb=args.shard_size_mb,
        max_short_side=args.max_short_side,
        train_max_short_side=args.train_max_short_side,
        val_max_short_side=args.val_max_short_side,
        train_raw_pixels=args.train_raw_pixels,
        val_raw_pixels=args.val_raw_pixels,
        quality=args.quality,
        workers=args.workers,
        overwrite=args.overwrite,
        progress_bar=not args.no_progress,
    )
    try:
        if args.dry_run:
            print(dry_run(opts))
            return 0
        result = convert(opts)
    except (OutputMismatchError, ValueError, FileNotFoundError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a vanished input: complete shards are kept
        print(f"make_shards: error: {err}; run the same command again to resume", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(
            "make_shards: interrupted; the finished shards are kept: run the same command again to resume",
            file=sys.stderr,
        )
        return 130  # 128 + SIGINT, as the shell reports a process Ctrl-C ended
    print(summary(result))
    if args.strict and result.manifest.rejected:
        print(f"make_shards: --strict: {len(result.manifest.rejected)} input(s) rejected", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
