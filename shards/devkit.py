"""Val labels from ImageNet's own development kit (ILSVRC2012_devkit_t12), as image-net.org ships it.

The devkit labels val image i (`ILSVRC2012_val_0000000i.JPEG`) by line i of
`data/ILSVRC2012_validation_ground_truth.txt`: an ILSVRC2012_ID from 1 to 1000, whose wnid is in
`data/meta.mat`. Those IDs are not in sorted-wnid order, so they cannot be used as labels
directly. meta.mat is a MATLAB file; scipy reads it, as torchvision's ImageNet dataset does, and is
imported only here (an optional dependency: `pip install scipy`).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

DEVKIT_FOLDER = "ILSVRC2012_devkit_t12"
META_FILE = "data/meta.mat"
GROUND_TRUTH_FILE = "data/ILSVRC2012_validation_ground_truth.txt"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def is_devkit(path: str | os.PathLike) -> bool:
    """Whether `path` is given as a devkit (a folder or a tar archive) rather than a labels file."""
    path = Path(path)
    return path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES)


def read_devkit_labels(path: str | os.PathLike) -> dict[str, str]:
    """Map val image stem (`ILSVRC2012_val_00000001`) -> wnid from a devkit folder or its .tar.gz."""
    meta_bytes, meta_where, truth_text, truth_where = _read_devkit_files(Path(path))
    wnid_of_id = _leaf_wnids(meta_bytes, meta_where)
    labels = {}
    for line_no, line in enumerate(truth_text.splitlines(), 1):
        text = line.strip()
        if not text.isdigit():
            raise ValueError(f"{truth_where}:{line_no}: expected an ILSVRC2012_ID (a number), got {line!r}")
        wnid = wnid_of_id.get(int(text))
        if wnid is None:
            raise ValueError(
                f"{truth_where}:{line_no}: ILSVRC2012_ID {text} is not one of the {len(wnid_of_id)} classes "
                f"in {meta_where}"
            )
        labels[f"ILSVRC2012_val_{line_no:08d}"] = wnid
    if not labels:
        raise ValueError(f"{truth_where}: no labels found")
    return labels


def read_devkit_classes(path: str | os.PathLike) -> list[str]:
    """The 1000 class wnids of a devkit's meta.mat, sorted: the usual class order (0 = n01440764)."""
    meta_bytes, meta_where, _, _ = _read_devkit_files(Path(path))
    return sorted(_leaf_wnids(meta_bytes, meta_where).values())


def _read_devkit_files(path: Path) -> tuple[bytes, str, str, str]:
    """meta.mat's bytes and the ground truth's text, each with where it was found (for messages)."""
    if path.is_dir():
        for root in (path, path / DEVKIT_FOLDER):
            if (root / META_FILE).is_file():
                truth = root / GROUND_TRUTH_FILE
                if not truth.is_file():
                    raise FileNotFoundError(f"{path}: the devkit has {META_FILE} but no {GROUND_TRUTH_FILE}")
                return (root / META_FILE).read_bytes(), str(root / META_FILE), truth.read_text(), str(truth)
        raise FileNotFoundError(
            f"{path}: not an ImageNet devkit folder (no {META_FILE} in it or in {DEVKIT_FOLDER}/); "
            "--val-labels takes a labels file, a devkit folder or ILSVRC2012_devkit_t12.tar.gz"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such devkit archive")
    try:
        with tarfile.open(path) as archive:
            meta_member = _member_ending(archive, META_FILE)
            truth_member = _member_ending(archive, GROUND_TRUTH_FILE)
            if meta_member is None or truth_member is None:
                missing = META_FILE if meta_member is None else GROUND_TRUTH_FILE
                raise ValueError(f"{path}: no {missing} in this archive: not an ImageNet devkit")
            meta_bytes = archive.extractfile(meta_member).read()
            truth_text = archive.extractfile(truth_member).read().decode()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"{path}: cannot read this archive ({error})") from error
    return meta_bytes, f"{path}:{meta_member.name}", truth_text, f"{path}:{truth_member.name}"


def _member_ending(archive: tarfile.TarFile, suffix: str) -> tarfile.TarInfo | None:
    for member in archive.getmembers():
        if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
            return member
    return None


def _leaf_wnids(meta_bytes: bytes, where: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid of the 1000 classes: the synsets of meta.mat without children."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as error:
        raise ValueError(f"{where}: reading the devkit's meta.mat needs scipy (pip install scipy)") from error
    try:
        synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
        ids, wnids, children = synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"]
    except (MatReadError, KeyError, IndexError, ValueError, TypeError) as error:
        raise ValueError(f"{where}: not the devkit's synset table ({type(error).__name__}: {error})") from error
    leaves = {int(i): str(w) for i, w, n in zip(ids, wnids, children, strict=True) if int(n) == 0}
    if not leaves:
        raise ValueError(f"{where}: no classes (synsets without children) in it")
    return leaves
