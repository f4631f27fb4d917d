"""Find the images of a split and their labels, before anything is written.

Every label problem (an unknown wnid, a flat val image with no label) is raised here, so a bad
labels file fails in seconds instead of after hours of conversion.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from shards.devkit import is_devkit, read_devkit_labels
from shards.text_file import read_text_file

MAX_KEY_CHARS = 64  # keeps "<key>.json" well inside USTAR's 100-byte name field
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_CLASS_TAR = re.compile(r"n\d{8}\.tar")


@dataclass(frozen=True)
class SourceImage:
    path: str  # absolute path on disk: the image file, or the archive holding it
    relpath: str  # relative to the split's root, '/'-separated; recorded in the sample's .json
    wnid: str
    label: int
    key: str  # the sample's key inside the tar: no dots, no spaces, unique in the split
    size: int  # source bytes, used to plan shard boundaries before anything is decoded
    offset: int | None = None  # where its bytes start in `path` when that is an archive (shards/archives.py)


@dataclass(frozen=True)
class Located:
    """A found input before keys are given: where its bytes are, and its label."""

    relpath: str
    wnid: str
    path: str
    size: int
    offset: int | None = None


@dataclass(frozen=True)
class ScanRejection:
    path: str
    reason: str


def utf8_name(name: str) -> str:
    """`name` itself where it is valid UTF-8; otherwise with each byte that is not written as `\\xNN`.

    Python gives such bytes of a file name as lone surrogates, which no UTF-8 text can hold (a tar
    member's name, a JSON file, the terminal): the converter records and prints this form, and reads
    the file by its real path."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders under `root` (ImageFolder's class order)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    entries = list(os.scandir(root))
    _refuse_class_tars(root, [entry.name for entry in entries if not entry.is_dir()])
    wnids = sorted(utf8_name(entry.name) for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not wnids:
        raise ValueError(f"{root}: no class folders found (expected {root}/<wnid>/*.JPEG)")
    return wnids


def scan_foldered(
    root: str | os.PathLike,
    class_index: dict[str, int],
    folder_wnids: dict[str, str] | None = None,
    leave_out_others: bool = False,
) -> tuple[list[SourceImage], list[ScanRejection]]:
    """Every file under `root/<wnid>/` (recursively), labelled by its folder.

    `folder_wnids` maps folder names to wnids where the folders are not named by wnid (ImageNetV2's
    are class indices: `--class-index-folders`). Files are taken whatever their extension (content
    is checked later, by bytes). A folder that names no known class is an error (left out, unread,
    with `leave_out_others`: `--only-listed-classes`); a file directly
    under `root` is rejected, not dropped. A folder with no class folders (ImageNet's flat val given
    without its labels) or no files in them is an error too: converting it would write an empty
    split and report success.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    found: list[Located] = []
    rejected: list[ScanRejection] = []
    folders = 0
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            if entry.name.startswith("."):
                continue
            wnid = utf8_name(entry.name) if folder_wnids is None else folder_wnids.get(entry.name)
            where = utf8_name(entry.path)
            if folder_wnids is not None and wnid is None:
                raise ValueError(
                    f"{where}: folder {entry.name!r} is not a class index from 0 to {len(folder_wnids) - 1} "
                    "(--class-index-folders)"
                )
            if wnid not in class_index:
                if leave_out_others:
                    continue
                raise ValueError(
                    f"{where}: folder {utf8_name(entry.name)!r} is not one of the {len(class_index)} known classes"
                    + (
                        " (to convert only the classes of --classes, add --only-listed-classes)"
                        if folder_wnids is None
                        else ""
                    )
                )
            folders += 1
            for dirpath, dirnames, filenames in os.walk(entry.path):
                dirnames.sort()
                folder = os.path.relpath(dirpath, root).replace(os.sep, "/")
                for name in sorted(filenames):
                    _locate(root, f"{folder}/{name}", wnid, found, rejected)
        else:
            rejected.append(ScanRejection(utf8_name(entry.name), "file outside any class folder"))
    _refuse_class_tars(root, [r.path for r in rejected])
    if not folders:
        flat = (
            f"; {len(rejected)} file(s) directly in it, e.g. {[r.path for r in rejected[:3]]}: "
            "a flat folder such as ImageNet's val needs --val-labels (a labels file or ImageNet's devkit)"
        )
        raise ValueError(f"{root}: no class folders (expected {root}/<wnid>/*.JPEG){flat if rejected else ''}")
    if not found:
        raise ValueError(f"{root}: no files in its {folders} class folder(s)")
    return with_keys(found, class_index), rejected


def _refuse_class_tars(root: Path, loose_files: list[str]) -> None:
    """Stop on `<wnid>.tar` files beside the class folders: ILSVRC2012_img_train.tar unpacks to one
    tar per class, and converting without them would silently leave those classes out."""
    class_tars = [name for name in loose_files if _CLASS_TAR.fullmatch(name)]
    if class_tars:
        raise ValueError(
            f"{root}: {len(class_tars)} class(es) still packed as tar files, e.g. {class_tars[:3]} (as "
            "ILSVRC2012_img_train.tar unpacks); unpack each into a folder of its name first: "
            f'cd {root} && for f in n*.tar; do mkdir "${{f%.tar}}" && tar xf "$f" -C "${{f%.tar}}" '
            '&& rm "$f"; done'
        )


def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """Map image stem -> wnid from Kaggle's LOC_val_solution.csv, plain 'filename wnid' lines, or
    ImageNet's devkit (a folder or ILSVRC2012_devkit_t12.tar.gz)."""
    if is_devkit(path):
        return read_devkit_labels(path)
    path = Path(path)
    text = read_text_file(path, "--val-labels")
    labels: dict[str, str] = {}
    first_line = text.splitlines()[0] if text else ""
    if first_line.replace(" ", "").lower().startswith("imageid,predictionstring"):
        for row_no, row in enumerate(csv.reader(text.splitlines()[1:]), 2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{path}:{row_no}: expected 'ImageId,PredictionString', got {row!r}")
            labels[_stem(row[0].strip())] = row[1].split()[0]
        return labels
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{line_no}: expected '<filename> <wnid>', got {line!r}")
        labels[_stem(parts[0])] = parts[1]
    if not labels:
        raise ValueError(f"{path}: no labels found")
    return labels


def scan_flat(
    root: str | os.PathLike, labels_file: str | os.PathLike, class_index: dict[str, int], leave_out_others: bool = False
) -> tuple[list[SourceImage], list[ScanRejection]]:
    """Files directly in `root`, labelled by `labels_file` (as `label_flat` says)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    names = [entry.name for entry in sorted(os.scandir(root), key=lambda e: e.name) if not entry.is_dir()]
    readable: list[Located] = []
    rejected: list[ScanRejection] = []
    for name in names:
        _locate(root, name, "", readable, rejected)
    by_name = {item.relpath: item for item in readable}
    labelled = label_flat(str(root), list(by_name), labels_file, class_index, leave_out_others)
    return with_keys([replace(by_name[name], wnid=wnid) for name, wnid in labelled], class_index), rejected


def label_flat(
    where: str,
    names: list[str],
    labels_file: str | os.PathLike,
    class_index: dict[str, int],
    leave_out_others: bool = False,
) -> list[tuple[str, str]]:
    """(name, wnid) for the flat files `names` of `where`, by `labels_file`: a file without a label,
    a label naming an unknown class, or no file at all is an error. With `leave_out_others`
    (`--only-listed-classes`), files labelled with an unknown class are left out instead."""
    labels = read_val_labels(labels_file)
    unknown = sorted({w for w in labels.values() if w not in class_index})
    if unknown and not leave_out_others:
        raise ValueError(
            f"{labels_file}: {len(unknown)} label(s) name unknown classes, e.g. {unknown[:5]} (to convert only "
            "the classes of --classes, add --only-listed-classes)"
        )
    unlabelled = [name for name in names if _stem(name) not in labels]
    if unlabelled:
        raise ValueError(f"{where}: {len(unlabelled)} image(s) have no label in {labels_file}, e.g. {unlabelled[:5]}")
    if not names:
        raise ValueError(f"{where}: no image files directly in it (a foldered {where}/<wnid>/ needs no labels file)")
    labelled = [(name, labels[_stem(name)]) for name in names if labels[_stem(name)] in class_index]
    if not labelled:
        raise ValueError(f"{where}: none of its {len(names)} images is of a class in the class list")
    return labelled


def fingerprint(images: list[SourceImage]) -> str:
    """A digest of which files go in, in what order, with what label and size: resume must see the same."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.relpath}\t{image.label}\t{image.key}\t{image.size}\n".encode())
    return digest.hexdigest()


def _stem(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    for ext in (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def make_key(filename: str) -> str:
    """A tar key from a file name: extension dropped, anything but [A-Za-z0-9_-] turned into '_'.

    Readers split a member name at its first dot (key.ext) and DALI's index is space-separated, so
    dots and spaces cannot stay.
    """
    stem = os.path.splitext(filename)[0] or "image"
    return _UNSAFE_KEY_CHARS.sub("_", stem)[:MAX_KEY_CHARS]


def _locate(root: Path, relpath: str, wnid: str, found: list[Located], rejected: list[ScanRejection]) -> None:
    """Add the file at `relpath` to `found`, or to `rejected` where it cannot be read (a link to
    nothing, a file removed while scanning) or is no regular file (a pipe would block its reader):
    listed with the other rejected files, not dropped."""
    path = os.path.join(root, relpath)
    relpath = utf8_name(relpath)
    try:
        status = os.stat(path)
    except OSError as err:
        rejected.append(ScanRejection(relpath, f"cannot be read ({err.strerror or err})"))
        return
    if not stat.S_ISREG(status.st_mode):
        rejected.append(ScanRejection(relpath, "not a regular file"))
        return
    found.append(Located(relpath, wnid, path, status.st_size))


def with_keys(found: list[Located], class_index: dict[str, int]) -> list[SourceImage]:
    """Attach unique keys, deciding collisions in sorted-path order so they are reproducible."""
    images = []
    used: set[str] = set()
    for item in sorted(found, key=lambda f: (f.relpath, f.wnid)):
        base = make_key(item.relpath.rsplit("/", 1)[-1])
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        images.append(
            SourceImage(item.path, item.relpath, item.wnid, class_index[item.wnid], key, item.size, item.offset)
        )
    return images


def read_source(image: SourceImage) -> bytes:
    """The source bytes of `image`: its whole file, or its `size` bytes at `offset` in an archive."""
    with open(image.path, "rb") as f:
        if image.offset is None:
            return f.read()
        f.seek(image.offset)
        data = f.read(image.size)
    if len(data) != image.size:
        raise OSError(f"{image.path} ends inside {image.relpath} (read {len(data)} of {image.size} bytes)")
    return data
