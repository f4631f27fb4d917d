"""Val labels from ImageNet's devkit (meta.mat + ground truth), as a folder or as the .tar.gz."""

from __future__ import annotations

import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from scipy.io import savemat

from shards.classes import imagenet_names
from shards.devkit import DEVKIT_FOLDER, GROUND_TRUTH_FILE, META_FILE
from shards.inputs import read_val_labels
from shards.manifest import read_manifest
from tests.conftest import run_tool

SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height")


def write_devkit(root: Path, val_wnids: list[str]) -> Path:
    """An ILSVRC2012_devkit_t12 folder laid out as image-net.org ships it.

    meta.mat holds the 1000 classes with IDs 1-1000 in an order that is not sorted by wnid (as in
    the real devkit, where ID 1 is n02119789) and two parent synsets with children, which are not
    classes; the ground truth gives line i, the label of ILSVRC2012_val_<i>, as such an ID.
    """
    wnids = sorted(imagenet_names())
    random.Random(7).shuffle(wnids)
    rows = [(i, wnid, wnid, "", 0, np.zeros((1, 0)), 0) for i, wnid in enumerate(wnids, 1)]
    rows += [(1001, "n00001740", "entity", "", 2, np.array([[1001, 1002]]), 19)]
    rows += [(1002, "n00002137", "abstraction", "", 1, np.array([[3]]), 18)]
    synsets = np.zeros((len(rows), 1), dtype=[(field, "O") for field in SYNSET_FIELDS])
    for n, row in enumerate(rows):
        for field, value in zip(SYNSET_FIELDS, row, strict=True):
            synsets[n, 0][field] = value
    devkit = root / DEVKIT_FOLDER
    (devkit / "data").mkdir(parents=True)
    savemat(devkit / META_FILE, {"synsets": synsets})
    id_of = {wnid: i for i, wnid in enumerate(wnids, 1)}
    (devkit / GROUND_TRUTH_FILE).write_text("".join(f"{id_of[w]}\n" for w in val_wnids))
    return devkit


def demo_val_labels(demo_imagenet: Path) -> dict[str, str]:
    """stem -> wnid of the demo's flat val folder, whose images are ILSVRC2012_val_<1..N>.JPEG."""
    pairs = [line.split() for line in (demo_imagenet / "val_labels.txt").read_text().splitlines()]
    return {name.removesuffix(".JPEG"): wnid for name, wnid in pairs}


def val_labels_in_shards(out: Path) -> dict[str, str]:
    """stem -> wnid of each val sample, by its label; the wnid in its .json must be the same."""
    manifest = read_manifest(out)
    urls = [str(out / s.file) for s in manifest.splits["val"].shards]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        got[meta["path"].removesuffix(".JPEG")] = manifest.classes[int(sample["cls"])].wnid
        assert got[meta["path"].removesuffix(".JPEG")] == meta["wnid"]
    return got


@pytest.fixture(scope="module")
def devkit(tmp_path_factory, demo_imagenet) -> tuple[Path, dict[str, str]]:
    labels = demo_val_labels(demo_imagenet)
    assert list(labels) == [f"ILSVRC2012_val_{n:08d}" for n in range(1, len(labels) + 1)]
    return write_devkit(tmp_path_factory.mktemp("devkit"), list(labels.values())), labels


@pytest.mark.parametrize("with_train", [True, False])
def test_make_shards_labels_a_flat_val_from_the_devkit(devkit, demo_imagenet, tmp_path, with_train):
    """With --train the classes are its folders; val alone takes the devkit's 1000 classes, sorted."""
    folder, labels = devkit
    out = tmp_path / "shards"
    train = ["--train", str(demo_imagenet / "train")] if with_train else []
    run_tool(
        "tools.make_shards",
        *(*train, "--val", str(demo_imagenet / "val")),
        *("--val-labels", str(folder), "--out", str(out), "--workers", "2", "--no-progress"),
        check=True,
    )
    assert val_labels_in_shards(out) == labels
    manifest = read_manifest(out)
    if with_train:
        assert [c.wnid for c in manifest.classes] == sorted(p.name for p in (demo_imagenet / "train").iterdir())
        return
    assert [c.wnid for c in manifest.classes] == sorted(imagenet_names())
    assert manifest.classes[0].name == imagenet_names()["n01440764"]
    plain = run_tool(
        "tools.make_shards",
        *("--val", str(demo_imagenet / "val"), "--val-labels", str(demo_imagenet / "val_labels.txt")),
        *("--out", str(tmp_path / "other"), "--no-progress"),
    )
    assert plain.returncode == 2 and "--classes is required" in plain.stderr


def test_the_devkit_reads_alike_as_folder_parent_folder_and_tar_gz(devkit, tmp_path):
    folder, labels = devkit
    archive = tmp_path / f"{DEVKIT_FOLDER}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=DEVKIT_FOLDER)
    assert read_val_labels(folder) == labels
    assert read_val_labels(folder.parent) == labels
    assert read_val_labels(archive) == labels


def test_a_bad_devkit_is_named_with_what_is_wrong(devkit, demo_imagenet, tmp_path):
    folder, labels = devkit
    bad = tmp_path / "bad" / DEVKIT_FOLDER
    (bad / "data").mkdir(parents=True)
    (bad / META_FILE).write_bytes((folder / META_FILE).read_bytes())
    truth = (folder / GROUND_TRUTH_FILE).read_text().splitlines()

    (bad / GROUND_TRUTH_FILE).write_text("\n".join(truth[:2] + ["n01440764"] + truth[3:]) + "\n")
    with pytest.raises(ValueError, match=rf"{GROUND_TRUTH_FILE}:3: expected an ILSVRC2012_ID"):
        read_val_labels(bad)
    (bad / GROUND_TRUTH_FILE).write_text("\n".join(truth[:1] + ["1001"] + truth[2:]) + "\n")
    with pytest.raises(ValueError, match=rf"{GROUND_TRUTH_FILE}:2: ILSVRC2012_ID 1001 is not one of the 1000 classes"):
        read_val_labels(bad)

    (bad / GROUND_TRUTH_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {GROUND_TRUTH_FILE}"):
        read_val_labels(bad)
    with pytest.raises(FileNotFoundError, match="not an ImageNet devkit folder"):
        read_val_labels(tmp_path)

    (bad / GROUND_TRUTH_FILE).write_text("\n".join(truth) + "\n")
    (bad / META_FILE).write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ValueError, match=rf"{META_FILE}: not the devkit's synset table"):
        read_val_labels(bad)

    not_a_devkit = tmp_path / "other.tar.gz"
    with tarfile.open(not_a_devkit, "w:gz") as tar:
        tar.add(folder / GROUND_TRUTH_FILE, arcname="x/data/ILSVRC2012_validation_ground_truth.txt")
    with pytest.raises(ValueError, match=f"no {META_FILE} in this archive"):
        read_val_labels(not_a_devkit)

    # The command line: exit status 2, the file and line named, nothing written.
    (bad / META_FILE).write_bytes((folder / META_FILE).read_bytes())
    (bad / GROUND_TRUTH_FILE).write_text("\n".join(truth[:1] + ["1001"] + truth[2:]) + "\n")
    out = tmp_path / "out"
    result = run_tool(
        "tools.make_shards",
        *("--train", str(demo_imagenet / "train"), "--val", str(demo_imagenet / "val")),
        *("--val-labels", str(bad), "--out", str(out), "--no-progress"),
    )
    assert result.returncode == 2
    assert f"{bad / GROUND_TRUTH_FILE}:2: ILSVRC2012_ID 1001" in result.stderr
    assert not out.exists() or not list(out.glob("*.tar"))


def test_without_scipy_the_devkit_asks_for_it(devkit, monkeypatch):
    folder, _ = devkit
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ValueError, match=r"meta.mat needs scipy \(pip install scipy\)"):
        read_val_labels(folder)
