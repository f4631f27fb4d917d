"""Class lists: which wnid gets which index, and its readable name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from shards.text_file import read_text_file

IMAGENET_CLASSES_FILE = Path(__file__).with_name("imagenet_classes.tsv")


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str | None


@cache
def imagenet_names() -> dict[str, str]:
    """Readable names of the 1000 ILSVRC-2012 classes, by wnid (n01440764 -> tench)."""
    names = {}
    for line in IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines():
        wnid, name = line.split("\t")
        names[wnid] = name
    return names


def imagenet_wnids() -> list[str]:
    """ImageNet-1k's 1000 wnids in its class order (sorted): class i is the i-th, as torchvision's
    weights, ImageNet-ReaL's labels and ImageNetV2's folder numbers count them."""
    return sorted(imagenet_names())


def read_class_file(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Read `--classes FILE`: one wnid per line, optionally a name after a tab or space.

    So Kaggle's LOC_synset_mapping.txt and Caffe's synset_words.txt (`n01440764 tench, Tinca tinca`)
    serve as they are.
    """
    entries: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for line_no, line in enumerate(read_text_file(path, "--classes").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        wnid, *name = line.split(maxsplit=1)
        if wnid in seen:
            raise ValueError(f"{path}:{line_no}: class {wnid!r} listed twice")
        seen.add(wnid)
        entries.append((wnid, name[0].strip() if name else None))
    if not entries:
        raise ValueError(f"{path}: no classes listed")
    return entries


def build_class_list(wnids: list[str], names: dict[str, str | None] | None = None) -> list[ClassInfo]:
    """Index classes in the given order; names come from `names`, else ImageNet's own list."""
    known = imagenet_names()
    names = names or {}
    return [ClassInfo(i, w, names.get(w) or known.get(w)) for i, w in enumerate(wnids)]
