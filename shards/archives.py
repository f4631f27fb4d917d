"""Read ImageNet's downloaded tar archives in place, so they need not be unpacked first.

ILSVRC2012_img_train.tar holds one `<wnid>.tar` per class, each holding that class's JPEGs;
ILSVRC2012_img_val.tar holds the 50,000 val JPEGs flat. Both are uncompressed, so every image is a
byte range of the archive: the scan records (offset, size) and the converter's workers read images
by offset, in shuffled order, as they would read files. This saves unpacking (about 150 GB written
and read once more). tarfile lists the members; what no library does is resolve members of the
nested class tars to offsets in the outer file, so that bookkeeping is here.

The relative paths recorded are those of the unpacked layout (`<wnid>/<file>` for train, `<file>`
for val), so the shards are the same bytes as those converted from the unpacked folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
from pathlib import Path

from shards.inputs import Located, ScanRejection, SourceImage, label_flat, utf8_name, with_keys
from shards.worker_pool import worker_pool

_CLASS_TAR = re.compile(r"(n\d{8})\.tar")
END_OF_ARCHIVE_BYTES = 2 * tarfile.BLOCKSIZE  # two zero blocks close every tar


def is_archive(path: str | os.PathLike) -> bool:
    """Whether an input given as `path` is a tar file (not a folder)."""
    return Path(path).is_file()


def list_archive_classes(path: str | os.PathLike) -> list[str]:
    """Sorted wnids of the `<wnid>.tar` members of a train archive (ImageFolder's class order)."""
    path = Path(path).resolve()
    with _open_tar(path) as outer:
        wnids = sorted(_class_members(path, outer))
    if not wnids:
        raise ValueError(f"{path}: no <wnid>.tar members (expected ImageNet's ILSVRC2012_img_train.tar)")
    return wnids


def scan_class_archive(
    path: str | os.PathLike, class_index: dict[str, int], workers: int = 1, leave_out_others: bool = False
) -> tuple[list[SourceImage], list[ScanRejection]]:
    """Every file in the `<wnid>.tar` members of `path`, labelled by that wnid (as `scan_foldered`;
    with `leave_out_others`, the members of other classes are left out unread).

    tarfile parses headers in Python (about 40 us each on this project's CPU machine: most of a
    minute for ImageNet's 1.28 million), so the class archives are listed by `workers` processes.
    """
    path = Path(path).resolve()
    with _open_tar(path) as outer:
        wnids = sorted(_class_members(path, outer))
    unknown = [w for w in wnids if w not in class_index]
    if unknown and not leave_out_others:
        raise ValueError(
            f"{path}: {len(unknown)} class archive(s) are not among the {len(class_index)} known classes, e.g. "
            f"{[f'{w}.tar' for w in unknown[:5]]} (to convert only the classes of --classes, add "
            "--only-listed-classes)"
        )
    wnids = [w for w in wnids if w in class_index]
    # One part per worker: each part lists the outer archive again (ImageNet's classes are alike in size).
    parts = [(str(path), wnids[i::workers]) for i in range(min(len(wnids), workers))]
    found: list[Located] = []
    rejected: list[ScanRejection] = []
    with worker_pool(workers) if workers > 1 and len(parts) > 1 else contextlib.nullcontext() as pool:
        for part_found, part_rejected in (pool.imap_unordered if pool else map)(_scan_classes, parts):
            found += part_found
            rejected += part_rejected
    if not found:
        raise ValueError(f"{path}: no files in its class archives")
    return with_keys(found, class_index), sorted(rejected, key=lambda r: r.path)


def _scan_classes(task: tuple[str, list[str]]) -> tuple[list[Located], list[ScanRejection]]:
    """The files of the class archives `wnids` of the train archive at `path` (in a worker process),
    and the members that are not files."""
    archive, wnids = task
    path = Path(archive)
    found, rejected = [], []
    with _open_tar(path) as outer:
        members = _class_members(path, outer)
        for wnid in wnids:
            member = members[wnid]
            where = f"{path} (member {member.name})"
            try:
                with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                    items = _whole_members(where, inner, path, member.offset_data, member.size)
            except tarfile.TarError as err:
                raise ValueError(f"{where}: not a readable tar: {err}") from err
            for item in items:
                relpath = f"{wnid}/{_name(item)}"
                if item.isreg():
                    # one string for every image of the archive (1.28 million for ImageNet's), not a copy each
                    found.append(Located(relpath, wnid, archive, item.size, member.offset_data + item.offset_data))
                else:
                    rejected.append(ScanRejection(relpath, _not_a_file(item)))
    return found, rejected


def scan_flat_archive(
    path: str | os.PathLike, labels_file: str | os.PathLike, class_index: dict[str, int], leave_out_others: bool = False
) -> tuple[list[SourceImage], list[ScanRejection]]:
    """The files of a flat archive (ILSVRC2012_img_val.tar), labelled by `labels_file` (as `scan_flat`)."""
    path = Path(path).resolve()
    with _open_tar(path) as archive:
        entries = _whole_members(str(path), archive, path, 0, path.stat().st_size)
    members = {_name(m): m for m in entries if m.isreg()}
    rejected = [ScanRejection(_name(m), _not_a_file(m)) for m in entries if not m.isreg()]
    nested = [name for name in members if "/" in name]
    if nested:
        raise ValueError(f"{path}: members in folders, e.g. {nested[:3]}: a flat archive of images was expected")
    archive = str(path)
    labelled = label_flat(archive, sorted(members), labels_file, class_index, leave_out_others)
    found = [Located(name, wnid, archive, members[name].size, members[name].offset_data) for name, wnid in labelled]
    return with_keys(found, class_index), rejected


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except tarfile.TarError as err:
        raise ValueError(
            f"{path}: not an uncompressed tar archive ({err}): ImageNet's downloads are plain .tar files; "
            "unpack anything else into a folder"
        ) from err


def _name(member: tarfile.TarInfo) -> str:
    return utf8_name(member.name.removeprefix("./"))  # tarfile decodes names as os.scandir does


def _class_members(path: Path, outer: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """wnid -> its `<wnid>.tar` member; any other member is an error (it would be left out silently)."""
    classes = {}
    others = []
    for member in _whole_members(str(path), outer, path, 0, path.stat().st_size):
        match = _CLASS_TAR.fullmatch(_name(member))
        if match and member.isreg():
            classes[match.group(1)] = member
        else:
            others.append(member.name)
    if others:
        raise ValueError(
            f"{path}: {len(others)} member(s) are not <wnid>.tar class archives, e.g. {others[:3]}: a train archive "
            "must be laid out as ImageNet's ILSVRC2012_img_train.tar (unpack another layout into a folder)"
        )
    return classes


def _whole_members(where: str, archive: tarfile.TarFile, path: Path, start: int, length: int) -> list[tarfile.TarInfo]:
    """The members of `archive` but its folders (bytes `start` to `start + length` of `path`),
    after checking that the archive is whole.

    tarfile stops without an error where a truncated archive ends (an interrupted download), which
    would drop the classes or images after that point silently: check that every member's data
    lies inside the archive and that tar's end-of-archive blocks follow the last member.
    """
    try:
        members = archive.getmembers()
    except tarfile.TarError as err:
        raise ValueError(
            f"{where}: not a readable tar archive ({err}): damaged or incomplete, download it again"
        ) from err
    end = max((m.offset_data + _padded(m.size) for m in members), default=0)
    if end + END_OF_ARCHIVE_BYTES > length or not _zeros_at(path, start + end, END_OF_ARCHIVE_BYTES):
        raise ValueError(
            f"{where}: the archive is incomplete ({length} bytes; its last member or its end-of-archive "
            "blocks are missing): download it again"
        )
    return [m for m in members if not m.isdir()]


def _not_a_file(member: tarfile.TarInfo) -> str:
    """Why a member is not converted: its data is elsewhere or absent (unpack the archive to follow links)."""
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"a {kind} link in the archive (to {member.linkname}), not a file: unpack the archive to convert it"
    return "not a regular file in the archive"


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _zeros_at(path: Path, offset: int, length: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return len(data) == length and not data.strip(b"\0")
