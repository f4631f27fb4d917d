"""Convert an ImageNet folder into shuffled tar shards: the engine behind `tools.make_shards`.

Shard boundaries are planned up front from the source file sizes, so they depend only on the
inputs and options. Each worker process then writes whole shards on its own (read, decode, tar,
checksum, index): image bytes never travel between processes, and a killed run resumes by
skipping the shards recorded as complete in a small progress file.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from shards.archives import is_archive, list_archive_classes, scan_class_archive, scan_flat_archive
from shards.classes import ClassInfo, build_class_list, imagenet_wnids, read_class_file
from shards.devkit import is_devkit, read_devkit_classes
from shards.folder_lock import FolderInUse, lock_folder
from shards.image_check import CheckedImage, check_image_bytes
from shards.inputs import (
    ScanRejection,
    SourceImage,
    fingerprint,
    list_class_folders,
    read_source,
    scan_flat,
    scan_foldered,
)
from shards.manifest import (
    MANIFEST_NAME,
    MIN_LABEL_DIGITS,
    SPLITS,
    FileNote,
    Manifest,
    SplitInfo,
    label_digits,
    read_manifest,
    write_manifest,
)
from shards.tar_writer import (
    TAR_BLOCK_BYTES,
    ShardInfo,
    ShardWriter,
    commit_shard,
    encode_sample,
    write_atomically,
)
from shards.worker_pool import worker_pool

DEFAULT_SHARD_SIZE_MB = 128  # ~1,100 train shards for ImageNet: enough to split over many ranks
DEFAULT_QUALITY = 90
PROGRESS_NAME = ".make_shards-progress.jsonl"
LOCK_NAME = ".make_shards.lock"  # held by the conversion writing to the folder
BYTES_PER_MB = 1_000_000
SAMPLE_OVERHEAD_BYTES = 4 * TAR_BLOCK_BYTES  # three headers, label, metadata and padding, roughly
# Planning shards of raw pixels from source sizes alone: ImageNet's JPEGs average about 110 KB for
# about 500x375x3 = 562 KB of pixels, so 5 bytes per source byte, and at most a 4:3 photograph at the
# short-side limit S (S x 4S/3 x 3 bytes).
RAW_BYTES_PER_SOURCE_BYTE = 5
RAW_BYTES_PER_SQUARE_SIDE = 4
FULL_SIZE_RAW_BYTES = {"train": "0.7 TB", "val": "28 GB"}  # 1.28M / 50k images of about 500x375 pixels


class OutputMismatchError(RuntimeError):
    """The output directory holds a conversion made with other arguments."""


@dataclass
class ConvertOptions:
    out: str
    train: str | None = None
    val: str | None = None
    val_labels: str | None = None
    classes: str | None = None
    seed: int = 0
    shard_size_mb: float = DEFAULT_SHARD_SIZE_MB
    max_short_side: int | None = None  # both splits, unless the split's own limit below is given
    train_max_short_side: int | None = None
    val_max_short_side: int | None = None
    train_raw_pixels: bool = False  # store train images as decoded pixels (PPM) instead of JPEG
    val_raw_pixels: bool = False
    class_index_folders: bool = False  # class folders named 0, 1, ...: positions in the class list
    only_listed_classes: bool = False  # convert the classes of `classes` only, leaving the others out
    quality: int = DEFAULT_QUALITY
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False
    progress_bar: bool = True

    def defining_options(self) -> dict:
        """The options that decide the output bytes (not workers or display)."""

        def absolute(p):
            return str(Path(p).resolve()) if p else None

        options = {
            "train": absolute(self.train),
            "val": absolute(self.val),
            "val_labels": absolute(self.val_labels),
            "classes": absolute(self.classes),
            "seed": self.seed,
            "shard_size_mb": self.shard_size_mb,
            "max_short_side": self.max_short_side,
            "quality": self.quality,
        }
        # Added only when given, so an output of a version without these options still matches.
        for split in SPLITS:
            if getattr(self, f"{split}_max_short_side") is not None:
                options[f"{split}_max_short_side"] = getattr(self, f"{split}_max_short_side")
            if self.raw_pixels(split):
                options[f"{split}_raw_pixels"] = True
        if self.class_index_folders:
            options["class_index_folders"] = True
        if self.only_listed_classes:
            options["only_listed_classes"] = True
        return options

    def short_side_limit(self, split: str) -> int | None:
        """The shorter side above which `split`'s images are shrunk and re-encoded; None: stored as given."""
        own = getattr(self, f"{split}_max_short_side")
        return self.max_short_side if own is None else own

    def raw_pixels(self, split: str) -> bool:
        """Whether `split` stores decoded pixels (PPM) rather than JPEG."""
        return getattr(self, f"{split}_raw_pixels")

    def check(self) -> None:
        """Option combinations no single flag can refuse."""
        if self.val and not self.val_labels and is_archive(self.val):
            raise ValueError(f"--val {self.val} is an archive, which is read as flat: it needs --val-labels")
        foldered = (self.train and not is_archive(self.train)) or (self.val and not self.val_labels)
        if self.only_listed_classes and not self.classes:
            raise ValueError("--only-listed-classes needs --classes FILE, the classes to convert")
        if self.only_listed_classes and self.class_index_folders:
            raise ValueError(
                "--only-listed-classes and --class-index-folders: folder i is class i of the whole list; "
                "convert every class, then evaluate with train.evaluate --class-subset"
            )
        if self.class_index_folders and not foldered:
            raise ValueError("--class-index-folders names the class folders of a foldered --train or --val; none given")
        out = Path(self.out).resolve()
        for split, folder in (("train", self.train), ("val", self.val)):
            if folder and not is_archive(folder) and out.is_relative_to(Path(folder).resolve()):
                raise ValueError(
                    f"--out {self.out} is inside --{split} {folder}: a rerun would read the shards written there as "
                    "inputs; write them elsewhere"
                )
        for split in SPLITS:
            if self.raw_pixels(split) and self.short_side_limit(split) is None:
                raise ValueError(
                    f"--{split}-raw-pixels needs --{split}-max-short-side (or --max-short-side): ImageNet's"
                    f" {split} split stored as full-size pixels would take about {FULL_SIZE_RAW_BYTES[split]}"
                )


@dataclass(frozen=True)
class ShardTask:
    split: str
    number: int
    images: list[SourceImage]
    max_short_side: int | None
    quality: int
    raw_pixels: bool = False
    label_digits: int = MIN_LABEL_DIGITS

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.number:06d}"


@dataclass
class ShardResult:
    """What one planned shard produced; `shard` is None when every input of it was rejected."""

    split: str
    number: int
    inputs: int
    shard: ShardInfo | None
    rejected: list[FileNote]
    converted: list[FileNote]
    resized: int


@dataclass
class ConvertResult:
    manifest: Manifest
    seconds: float
    resumed: bool
    already_complete: bool


def resolve_classes(opts: ConvertOptions) -> list[ClassInfo]:
    if opts.classes:
        entries = read_class_file(opts.classes)
        classes = build_class_list([w for w, _ in entries], dict(entries))
    elif opts.class_index_folders:
        classes = build_class_list(imagenet_wnids())
    elif opts.train:
        wnids = list_archive_classes(opts.train) if is_archive(opts.train) else _sorted_folders(opts.train)
        classes = build_class_list(wnids)
    elif opts.val and not opts.val_labels:
        classes = build_class_list(_sorted_folders(opts.val))
    elif opts.val_labels and is_devkit(opts.val_labels):
        classes = build_class_list(read_devkit_classes(opts.val_labels))  # its 1000 classes, sorted
    else:
        raise ValueError("--classes is required when only a flat --val is given with a labels file")
    return classes


def _sorted_folders(root: str) -> list[str]:
    """The class folders in sorted order, the class list when no other is given; numbered folders
    whose sorted order is not their numbers' (ImageNetV2's 0-999) are refused, not mislabelled."""
    names = list_class_folders(root)
    if all(name.isdecimal() for name in names) and names != sorted(names, key=int):
        raise ValueError(
            f"{root}: the class folders are numbered ({names[0]}, {names[1]}, ..., as ImageNetV2 ships them); "
            f"sorted as names, folder {names[2]!r} would be class 2, not class {int(names[2])}: give "
            "--class-index-folders (folder i holds class i of --classes, by default of ImageNet-1k's 1000 "
            "classes), or --classes FILE to set the order"
        )
    return names


def plan_splits(
    opts: ConvertOptions, classes: list[ClassInfo]
) -> dict[str, tuple[list[SourceImage], list[ScanRejection]]]:
    """List every split's inputs in write order; raises on any label problem before writing."""
    if not opts.train and not opts.val:
        raise ValueError("nothing to convert: give --train and/or --val")
    if opts.val_labels and not opts.val:
        raise ValueError("--val-labels needs --val")
    class_index = {c.wnid: c.index for c in classes}
    folder_wnids = {str(c.index): c.wnid for c in classes} if opts.class_index_folders else None
    plans = {}
    if opts.train:
        subset = opts.only_listed_classes
        if is_archive(opts.train):
            images, rejected = scan_class_archive(opts.train, class_index, opts.workers, subset)
        else:
            images, rejected = scan_foldered(opts.train, class_index, folder_wnids, subset)
        _require_every_class(opts.train, images, classes)
        # DALI's reader shuffles only inside a small buffer, so the global mix happens here.
        random.Random(opts.seed).shuffle(images)
        plans["train"] = (images, rejected)
    if opts.val:
        if opts.val_labels:
            scan = scan_flat_archive if is_archive(opts.val) else scan_flat
            plans["val"] = scan(opts.val, opts.val_labels, class_index, opts.only_listed_classes)
        else:
            plans["val"] = scan_foldered(opts.val, class_index, folder_wnids, opts.only_listed_classes)
    return plans


def _require_every_class(root: str, images: list[SourceImage], classes: list[ClassInfo]) -> None:
    """A class with no training image is an incomplete copy or unpacking, not a choice: stop (as
    torchvision's ImageFolder does) rather than train a classifier on classes it never sees."""
    present = {image.wnid for image in images}
    empty = [c.wnid for c in classes if c.wnid not in present]
    if empty:
        raise ValueError(
            f"{root}: no images for {len(empty)} of the {len(classes)} classes, e.g. {empty[:5]} (an empty or "
            "missing class folder): complete the copy; to train without them, remove their folders "
            "(and their lines in --classes)"
        )


def plan_shards(
    images: list[SourceImage], shard_size_mb: float, raw_short_side: int | None = None
) -> list[list[SourceImage]]:
    """Cut the ordered inputs into shards of about `shard_size_mb`, counted in source bytes.

    Sizes are known before decoding, so the plan is fixed by the inputs alone. With
    --max-short-side the stored images shrink and the shards come out smaller than planned.
    Images stored as raw pixels, at most `raw_short_side` on the shorter side, are counted at an
    estimate of their pixel bytes (see RAW_BYTES_PER_SOURCE_BYTE).
    """
    target_bytes = shard_size_mb * BYTES_PER_MB
    raw_cap = None if raw_short_side is None else RAW_BYTES_PER_SQUARE_SIDE * raw_short_side**2
    shards: list[list[SourceImage]] = []
    current: list[SourceImage] = []
    current_bytes = 0
    for image in images:
        current.append(image)
        stored = image.size if raw_cap is None else min(raw_cap, RAW_BYTES_PER_SOURCE_BYTE * image.size)
        current_bytes += stored + SAMPLE_OVERHEAD_BYTES
        if current_bytes >= target_bytes:
            shards.append(current)
            current, current_bytes = [], 0
    if current:
        shards.append(current)
    return shards


def write_shard(directory: str, task: ShardTask) -> ShardResult:
    """Worker-side: check every image of one planned shard and write it under temporary names.

    The caller makes it durable and visible with `commit_shard`.
    """
    writer = ShardWriter(directory, task.stem)
    rejected, converted, resized = [], [], 0
    try:
        for image in task.images:
            checked = _check_source(image, task)
            if checked.rejected:
                rejected.append(FileNote(task.split, image.relpath, checked.rejected))
                continue
            if checked.converted:
                converted.append(FileNote(task.split, image.relpath, checked.converted))
            resized += checked.resized
            meta = {"path": image.relpath, "wnid": image.wnid, "width": checked.width, "height": checked.height}
            components = [
                ("cls", f"{image.label:0{task.label_digits}d}".encode()),
                ("ppm" if task.raw_pixels else "jpg", checked.encoded),
                ("json", json.dumps(meta, sort_keys=True, ensure_ascii=True).encode()),
            ]
            writer.add(encode_sample(image.key, components))
        info = writer.finish() if writer.samples else None
    finally:
        writer.abort()  # no-op after close(); removes the temporary file otherwise
    return ShardResult(task.split, task.number, len(task.images), info, rejected, converted, resized)


def _check_source(image: SourceImage, task: ShardTask) -> CheckedImage:
    try:
        data = read_source(image)
    except OSError as err:
        return CheckedImage(None, rejected=f"cannot read file: {err}")
    return check_image_bytes(data, task.max_short_side, task.quality, task.raw_pixels)


def plan_conversion(
    opts: ConvertOptions,
) -> tuple[list[ClassInfo], dict[str, tuple[list[SourceImage], list[ScanRejection]]], dict, list[ShardTask]]:
    """Everything a conversion decides before it decodes or writes anything: the classes, each
    split's inputs in write order (and those rejected at scan), the options an existing output
    must match, and the shards. Raises on any label or option problem."""
    opts.check()
    classes = resolve_classes(opts)
    plans = plan_splits(opts, classes)
    options = opts.defining_options()
    options["inputs"] = {split: fingerprint(images) for split, (images, _) in plans.items()}
    tasks = [
        ShardTask(
            split,
            number,
            shard_images,
            opts.short_side_limit(split),
            opts.quality,
            opts.raw_pixels(split),
            label_digits(len(classes)),
        )
        for split, (images, _) in plans.items()
        for number, shard_images in enumerate(
            plan_shards(images, opts.shard_size_mb, opts.short_side_limit(split) if opts.raw_pixels(split) else None)
        )
    ]
    return classes, plans, options, tasks


def convert(opts: ConvertOptions) -> ConvertResult:
    """Run (or resume) a conversion; returns the manifest it wrote."""
    started = time.monotonic()
    classes, plans, options, tasks = plan_conversion(opts)

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = lock_folder(out, LOCK_NAME)  # released when this process ends, however it ends
    except FolderInUse as holder:
        raise OutputMismatchError(
            f"--out {out} is in use by another make_shards ({holder}): wait for it to end (a second "
            "conversion there would remove the first's unfinished shards and write over them)"
        ) from None
    try:
        return _convert_into(out, opts, started, classes, plans, options, tasks)
    finally:  # removed while still held, so that the output is the same bytes as without it
        (out / LOCK_NAME).unlink(missing_ok=True)
        lock.close()


def _convert_into(
    out: Path,
    opts: ConvertOptions,
    started: float,
    classes: list[ClassInfo],
    plans: dict[str, tuple[list[SourceImage], list[ScanRejection]]],
    options: dict,
    tasks: list[ShardTask],
) -> ConvertResult:
    """`convert` once it holds `out`: resume or start, write the missing shards, then the manifest."""
    if opts.overwrite:
        _remove_owned_files(out)
    existing = _existing_manifest(out)
    if existing is not None:
        if existing.options != options:
            raise OutputMismatchError(
                f"{out / MANIFEST_NAME} was written with other arguments or inputs; use --overwrite to replace it"
            )
        return ConvertResult(existing, time.monotonic() - started, resumed=False, already_complete=True)

    done = load_progress(out, options)
    progress = ProgressLog(out / PROGRESS_NAME, options)
    for tmp in out.glob("*.tmp"):
        tmp.unlink()
    todo = [t for t in tasks if (t.split, t.number) not in done]
    total_inputs = sum(len(t.images) for t in tasks)
    with tqdm(
        total=total_inputs,
        initial=total_inputs - sum(len(t.images) for t in todo),
        unit="img",
        desc="make_shards",
        disable=not opts.progress_bar,
        dynamic_ncols=True,
    ) as bar:
        if todo:

            def commit(result: ShardResult) -> None:
                if result.shard is not None:
                    commit_shard(out, result.shard)
                done[(result.split, result.number)] = result
                progress.append(result)

            # One thread makes finished shards durable, so no worker sits in fsync.
            try:
                with worker_pool(min(max(1, opts.workers), len(todo))) as pool, ThreadPoolExecutor(1) as committer:
                    commits = []
                    for result in pool.imap_unordered(_write_shard_in_worker, [(str(out), t) for t in todo]):
                        commits.append(committer.submit(commit, result))
                        bar.update(result.inputs)
                    for c in commits:
                        c.result()
            except (OSError, KeyboardInterrupt) as err:  # a full disk, Ctrl-C: the workers are stopped,
                for tmp in out.glob("*.tmp"):  # committed shards kept for a rerun; unfinished ones would
                    tmp.unlink(missing_ok=True)  # hold on to space the rerun needs
                if isinstance(err, OSError) and err.filename is None:  # a failed write or fsync names no file
                    raise OSError(err.errno, f"{err.strerror} (writing shards to {out})") from err
                raise

    manifest = _build_manifest(classes, plans, tasks, done, options, opts)
    write_manifest(out, manifest)
    progress.remove()
    resumed = len(todo) < len(tasks)
    return ConvertResult(manifest, time.monotonic() - started, resumed=resumed, already_complete=False)


def _write_shard_in_worker(args: tuple[str, ShardTask]) -> ShardResult:
    return write_shard(*args)


def _build_manifest(
    classes: list[ClassInfo],
    plans: dict[str, tuple[list[SourceImage], list[ScanRejection]]],
    tasks: list[ShardTask],
    done: dict[tuple[str, int], ShardResult],
    options: dict,
    opts: ConvertOptions,
) -> Manifest:
    splits, rejected, converted = {}, [], []
    for split, (_, scan_rejections) in plans.items():
        results = [done[(t.split, t.number)] for t in tasks if t.split == split]
        shards = [r.shard for r in results if r.shard is not None]
        splits[split] = SplitInfo(
            samples=sum(s.samples for s in shards),
            shards=shards,
            resized=sum(r.resized for r in results),
            max_short_side=opts.short_side_limit(split),
            image_ext="ppm" if opts.raw_pixels(split) else "jpg",
        )
        rejected += [FileNote(split, r.path, r.reason) for r in scan_rejections]
        rejected += [note for r in results for note in r.rejected]
        converted += [note for r in results for note in r.converted]
    return Manifest(classes=classes, splits=splits, rejected=rejected, converted=converted, options=options)


def _owned_files(out: Path) -> list[Path]:
    patterns = ("train-*.tar", "train-*.idx", "val-*.tar", "val-*.idx", "*.tmp", MANIFEST_NAME, PROGRESS_NAME)
    return [p for pattern in patterns for p in out.glob(pattern)]


def _remove_owned_files(out: Path) -> None:
    for path in _owned_files(out):
        path.unlink(missing_ok=True)


def _existing_manifest(out: Path) -> Manifest | None:
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        return read_manifest(out)
    except ValueError as err:
        raise OutputMismatchError(f"{err}; use --overwrite to replace it") from err


def load_progress(out: Path, options: dict) -> dict[tuple[str, int], ShardResult]:
    """Shards a killed run finished, checked to still be on disk; {} for a fresh output."""
    path = out / PROGRESS_NAME
    if not path.exists():
        leftovers = [p.name for p in _owned_files(out) if not p.name.endswith(".tmp")]
        if leftovers:
            raise OutputMismatchError(
                f"{out} already holds shards ({leftovers[0]}, ...) from an unknown conversion; use --overwrite"
            )
        return {}
    lines = _complete_lines(path)
    if not lines or json.loads(lines[0]).get("options") != options:
        raise OutputMismatchError(
            f"{out} holds an unfinished conversion with other arguments or inputs; use --overwrite to restart"
        )
    done = {}
    for line in lines[1:]:
        r = json.loads(line)
        result = ShardResult(
            split=r["split"],
            number=r["number"],
            inputs=r["inputs"],
            shard=ShardInfo(**r["shard"]) if r["shard"] else None,
            rejected=[FileNote(**n) for n in r["rejected"]],
            converted=[FileNote(**n) for n in r["converted"]],
            resized=r["resized"],
        )
        shard = result.shard
        if shard is not None:
            tar = out / shard.file
            if not tar.is_file() or tar.stat().st_size != shard.bytes or not (out / shard.index_file).is_file():
                continue  # vanished or changed since: write it again
        done[(result.split, result.number)] = result
    return done


def _complete_lines(path: Path) -> list[str]:
    """The lines of `path` that end in a newline: a run killed mid-append leaves a partial last line."""
    return path.read_text(encoding="utf-8").split("\n")[:-1]


class ProgressLog:
    """Append-only record of committed shards: an options line, then one JSON line per shard.

    Appending keeps the cost per shard constant (rewriting one file whole after every shard would
    write O(shards^2) bytes over an ImageNet run); each line is fsynced before the next shard counts.
    """

    def __init__(self, path: Path, options: dict):
        """Continue the log at `path` (as `load_progress` accepted it) or start one."""
        self.path = path
        if path.exists():
            os.truncate(path, path.read_bytes().rfind(b"\n") + 1)  # drop a partial last line
        else:
            write_atomically(path, (json.dumps({"options": options}, sort_keys=True) + "\n").encode())
        self.file = open(path, "a", encoding="utf-8")

    def append(self, result: ShardResult) -> None:
        self.file.write(json.dumps(asdict(result), sort_keys=True) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def remove(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def dry_run(opts: ConvertOptions) -> str:
    """What `convert` would do with these options, without decoding or writing anything: the
    classes, each split's images, source bytes and shards, the files rejected at scan, and what
    --out holds. Raises as `convert` would on a label or option problem."""
    classes, plans, options, tasks = plan_conversion(opts)
    subset = " (those of --classes; images of other classes left out)" if opts.only_listed_classes else ""
    lines = [f"make_shards --dry-run: nothing written; {len(classes)} classes{subset}"]
    for split, (images, rejected) in plans.items():
        shards = sum(1 for t in tasks if t.split == split)
        lines.append(
            f"  {split:5s}: {len(images)} images, {sum(i.size for i in images) / BYTES_PER_MB:.1f} MB of source "
            f"files, {_count(shards, 'shard')}; {len(rejected)} rejected at scan"
        )
    for split, (_, rejected) in plans.items():
        lines += [f"  rejected {split}/{r.path}: {r.reason}" for r in rejected]
    lines.append(f"  --out {opts.out}: {_output_state(Path(opts.out), options, tasks, opts.overwrite)}")
    return "\n".join(lines)


def _output_state(out: Path, options: dict, tasks: list[ShardTask], overwrite: bool) -> str:
    """What a run would find in `out`, read without changing it."""
    if not out.is_dir() or not _owned_files(out):
        return "holds no conversion; a run would write every shard"
    if overwrite:
        return "holds files of a conversion; with --overwrite a run would remove them and write every shard"
    try:
        existing = _existing_manifest(out)
        if existing is not None:
            if existing.options != options:
                return "holds a conversion made with other arguments or inputs; a run would stop (use --overwrite)"
            return "holds this conversion, complete; a run would do nothing"
        done = load_progress(out, options)
    except OutputMismatchError as err:
        return f"a run would stop: {err}"
    return f"holds {len(done)} of the {_count(len(tasks), 'shard')} of this conversion; a run would write the rest"


def summary(result: ConvertResult) -> str:
    """The closing lines the converter prints."""
    m = result.manifest
    lines = []
    state = "already complete" if result.already_complete else ("resumed and finished" if result.resumed else "done")
    subset = " (those of --classes; images of other classes left out)" if m.options.get("only_listed_classes") else ""
    lines.append(f"make_shards: {state} in {result.seconds:.1f} s, {len(m.classes)} classes{subset}")
    for split, info in m.splits.items():
        total_bytes = sum(s.bytes for s in info.shards)
        rejected = sum(1 for r in m.rejected if r.split == split)
        converted = sum(1 for c in m.converted if c.split == split)
        lines.append(
            f"  {split:5s}: {info.samples} samples in {_count(len(info.shards), 'shard')},"
            f" {total_bytes / BYTES_PER_MB:.1f} MB;"
            f" {rejected} rejected, {converted} re-encoded, {info.resized} resized"
            + ("" if info.max_short_side is None else f" to short side {info.max_short_side}")
            + ("; stored as raw pixels (PPM)" if info.image_ext == "ppm" else "")
        )
    for note in m.rejected:
        lines.append(f"  rejected {note.split}/{note.path}: {note.reason}")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
