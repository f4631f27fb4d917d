"""Converting ImageNet's downloaded archives in place: ILSVRC2012_img_train.tar (a tar of class
tars), ILSVRC2012_img_val.tar (flat) and the devkit, with nothing unpacked."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from shards.devkit import DEVKIT_FOLDER
from shards.manifest import read_manifest
from tests.conftest import run_tool
from tests.test_devkit import demo_val_labels, write_devkit
from tools.make_demo_data import pack_flat_archive, pack_train_archive
from tools.make_shards import main as make_shards


def test_the_downloaded_archives_give_the_shards_of_the_unpacked_folders(tmp_path, demo_imagenet):
    """The three files from image-net.org, unpacked or not, make the same bytes (a bad image too)."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    wnids = sorted(d.name for d in train.iterdir())
    (train / wnids[2] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    train_tar = pack_train_archive(train, downloads / "ILSVRC2012_img_train.tar")
    val_tar = pack_flat_archive(demo_imagenet / "val", downloads / "ILSVRC2012_img_val.tar")
    devkit = write_devkit(tmp_path / "devkit", list(demo_val_labels(demo_imagenet).values()))
    devkit_tar = downloads / f"{DEVKIT_FOLDER}.tar.gz"
    with tarfile.open(devkit_tar, "w:gz") as tar:
        tar.add(devkit, arcname=DEVKIT_FOLDER)

    options = ["--shard-size-mb", "0.05", "--workers", "2", "--no-progress"]
    unpacked, packed = tmp_path / "from-folders", tmp_path / "from-archives"
    run_tool(
        "tools.make_shards",
        *("--train", str(train), "--val", str(demo_imagenet / "val")),
        *("--val-labels", str(demo_imagenet / "val_labels.txt"), "--out", str(unpacked), *options),
        check=True,
    )
    run_tool(
        "tools.make_shards",
        *("--train", str(train_tar), "--val", str(val_tar), "--val-labels", str(devkit_tar)),
        *("--out", str(packed), *options),
        check=True,
    )

    expected, got = read_manifest(unpacked), read_manifest(packed)
    assert got.classes == expected.classes and [c.wnid for c in got.classes] == wnids
    assert got.splits == expected.splits and len(got.splits["train"].shards) > 1
    assert [(n.path, n.reason) for n in got.rejected] == [(n.path, n.reason) for n in expected.rejected]
    assert [n.path for n in got.rejected] == [f"{wnids[2]}/broken.JPEG"]
    written = sorted(p.name for p in unpacked.glob("*-*.*"))
    assert written == sorted(p.name for p in packed.glob("*-*.*"))
    for name in written:
        assert (packed / name).read_bytes() == (unpacked / name).read_bytes(), name


@pytest.fixture(scope="module")
def train_tar(tmp_path_factory, demo_imagenet) -> Path:
    root = tmp_path_factory.mktemp("train-archive")
    return pack_train_archive(demo_imagenet / "train", root / "ILSVRC2012_img_train.tar")


def data_end(member: tarfile.TarInfo) -> int:
    """Where `member`'s data, padded to whole blocks, ends in its archive."""
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def make_shards_error(capsys, *args: str) -> str:
    """Run make_shards in this process; it must exit 2 and write nothing. Returns its error message."""
    out = Path(args[args.index("--out") + 1])
    assert make_shards([*args, "--no-progress"]) == 2
    assert not out.exists() or not list(out.iterdir())
    return capsys.readouterr().err


def test_an_incomplete_download_is_refused(tmp_path, train_tar, capsys):
    """tarfile reads an archive cut at a member's end without an error, as one with fewer classes."""
    data = train_tar.read_bytes()
    with tarfile.open(train_tar) as tar:
        members = tar.getmembers()
    last_whole = data_end(members[2])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[:last_whole])
    with tarfile.open(cut) as tar:
        assert len(tar.getmembers()) == 3  # no error from tarfile: the other classes would be gone
    out = tmp_path / "out"
    error = make_shards_error(capsys, "--train", str(cut), "--out", str(out))
    assert f"{cut}: the archive is incomplete ({last_whole} bytes" in error and "download it again" in error

    cut.write_bytes(data[: len(data) // 2])  # inside a member's data
    error = make_shards_error(capsys, "--train", str(cut), "--out", str(out))
    assert f"{cut}: not a readable tar archive" in error and "download it again" in error

    # A class archive cut short inside an outer archive that is whole.
    first = members[0]
    inner = data[first.offset_data : first.offset_data + first.size]
    broken = tmp_path / "class-tars"
    broken.mkdir()
    (broken / first.name).write_bytes(inner)
    with tarfile.open(broken / first.name) as tar:
        inner_end = data_end(tar.getmembers()[-1])
    (broken / first.name).write_bytes(inner[:inner_end])
    rebuilt = tmp_path / "rebuilt.tar"
    with tarfile.open(rebuilt, "w") as tar:
        tar.add(broken / first.name, arcname=first.name)
    error = make_shards_error(capsys, "--train", str(rebuilt), "--out", str(out))
    assert f"{rebuilt} (member {first.name}):" in error


def test_archives_of_another_layout_are_named(tmp_path, demo_imagenet, train_tar, capsys):
    out = tmp_path / "out"
    val_tar = pack_flat_archive(demo_imagenet / "val", tmp_path / "ILSVRC2012_img_val.tar")
    error = make_shards_error(capsys, "--train", str(val_tar), "--out", str(out))
    images = len(list((demo_imagenet / "val").iterdir()))
    assert f"{val_tar}: {images} member(s) are not <wnid>.tar class archives, e.g. ['ILSVRC2012_val_00000001" in error

    error = make_shards_error(capsys, "--train", str(train_tar), "--val", str(val_tar), "--out", str(out))
    assert f"--val {val_tar} is an archive, which is read as flat: it needs --val-labels" in error

    error = make_shards_error(
        capsys, "--train", str(train_tar), "--val", str(train_tar), "--val-labels",
        str(demo_imagenet / "val_labels.txt"), "--out", str(out),
    )  # fmt: skip
    assert f"{train_tar}: 10 image(s) have no label in" in error

    gzipped = tmp_path / "train.tar.gz"
    with tarfile.open(gzipped, "w:gz") as tar:
        tar.add(train_tar, arcname="inner.tar")
    error = make_shards_error(capsys, "--train", str(gzipped), "--out", str(out))
    assert f"{gzipped}: not an uncompressed tar archive" in error


def test_links_in_an_archive_are_listed_as_rejected_not_dropped(tmp_path, demo_imagenet):
    """A link member has no bytes of its own at an offset: it is named in the manifest, with why."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    wnid = sorted(d.name for d in train.iterdir())[0]
    first = sorted((train / wnid).iterdir())[0]
    (train / wnid / "soft.JPEG").symlink_to(first.name)
    archive = tmp_path / "archive" / "ILSVRC2012_img_train.tar"
    archive.parent.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    with tarfile.open(archive, "w") as outer:
        for folder in sorted(train.iterdir()):
            with tarfile.open(staging / f"{folder.name}.tar", "w") as inner:  # links stored as links
                for image in sorted(folder.iterdir()):
                    inner.add(image, arcname=image.name)
                if folder.name == wnid:
                    hard = tarfile.TarInfo("hard.JPEG")
                    hard.type, hard.linkname = tarfile.LNKTYPE, first.name
                    inner.addfile(hard)
            outer.add(staging / f"{folder.name}.tar", arcname=f"{folder.name}.tar")
    out = tmp_path / "shards"
    run_tool("tools.make_shards", "--train", str(archive), "--out", str(out), "--no-progress", check=True)
    manifest = read_manifest(out)
    reasons = {note.path: note.reason for note in manifest.rejected}
    assert set(reasons) == {f"{wnid}/soft.JPEG", f"{wnid}/hard.JPEG"}
    assert reasons[f"{wnid}/soft.JPEG"].startswith(f"a symbolic link in the archive (to {first.name}), not a file")
    assert reasons[f"{wnid}/hard.JPEG"].startswith(f"a hard link in the archive (to {first.name}), not a file")
    images = sum(len(list(d.iterdir())) for d in (demo_imagenet / "train").iterdir())
    assert manifest.splits["train"].samples == images


def test_only_the_listed_classes_are_converted_from_folders_and_archives(tmp_path, demo_imagenet, train_tar, capsys):
    """ImageNet-100's way: --classes lists a subset in its own order and --only-listed-classes leaves
    the other classes' folders, class archives and val labels out; both inputs give the same bytes."""
    wnids = sorted(d.name for d in (demo_imagenet / "train").iterdir())
    chosen = [wnids[7], wnids[2], wnids[5]]
    classes = tmp_path / "subset.txt"
    classes.write_text("".join(f"{w}\n" for w in chosen))
    labels = demo_imagenet / "val_labels.txt"
    val_tar = pack_flat_archive(demo_imagenet / "val", tmp_path / "ILSVRC2012_img_val.tar")
    subset = ["--classes", str(classes), "--only-listed-classes", "--workers", "2", "--no-progress"]
    from_folders, from_archives = tmp_path / "folders", tmp_path / "archives"
    val = ["--val-labels", str(labels)]
    assert make_shards(["--train", str(demo_imagenet / "train"), "--val", str(demo_imagenet / "val"), *val,
                        "--out", str(from_folders), *subset]) == 0  # fmt: skip
    assert "3 classes (those of --classes; images of other classes left out)" in capsys.readouterr().out
    assert make_shards(["--train", str(train_tar), "--val", str(val_tar), *val, "--out", str(from_archives),
                        *subset]) == 0  # fmt: skip

    manifest = read_manifest(from_folders)
    assert [c.wnid for c in manifest.classes] == chosen
    expected = {
        "train": sorted(p.name for w in chosen for p in (demo_imagenet / "train" / w).iterdir()),
        "val": sorted(line.split()[0] for line in labels.read_text().splitlines() if line.split()[1] in chosen),
    }
    for split, names in expected.items():
        urls = [str(from_folders / s.file) for s in manifest.splits[split].shards]
        samples = [json.loads(s["json"]) | {"cls": int(s["cls"])} for s in wds.WebDataset(urls, shardshuffle=False)]
        assert sorted(s["path"].rsplit("/", 1)[-1] for s in samples) == names, split
        assert all(s["cls"] == chosen.index(s["wnid"]) for s in samples), split
    written = sorted(p.name for p in from_folders.glob("*-*.*"))
    assert written == sorted(p.name for p in from_archives.glob("*-*.*"))
    for name in written:
        assert (from_archives / name).read_bytes() == (from_folders / name).read_bytes(), name

    without = make_shards_error(
        capsys, "--train", str(train_tar), "--classes", str(classes), "--out", str(tmp_path / "a")
    )
    assert "7 class archive(s) are not among the 3 known classes" in without and "--only-listed-classes" in without
    no_list = make_shards_error(
        capsys, "--train", str(train_tar), "--only-listed-classes", "--out", str(tmp_path / "b")
    )
    assert "--only-listed-classes needs --classes FILE" in no_list


def test_file_names_that_are_not_utf8_are_converted_and_recorded_escaped(tmp_path, demo_imagenet):
    """Names in another encoding (Latin-1 here) reach Python as lone surrogates, which no UTF-8 text
    holds: the converter read them, then failed on the inputs' fingerprint. They are converted like
    any file, from folders and from an archive alike, and recorded and printed with `\\xNN` escapes."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    wnid = sorted(d.name for d in train.iterdir())[0]
    photo = sorted((train / wnid).iterdir())[0].read_bytes()
    folder = os.fsencode(train / wnid)
    (Path(os.fsdecode(folder + b"/caf\xe9.JPEG"))).write_bytes(photo)
    os.mkdir(folder + b"/sub\xff")
    Path(os.fsdecode(folder + b"/sub\xff/x.JPEG")).write_bytes(photo)
    Path(os.fsdecode(folder + b"/empty\xe9.JPEG")).write_bytes(b"")
    archive = pack_train_archive(train, tmp_path / "ILSVRC2012_img_train.tar")
    outputs = {}
    for source in (train, archive):
        out = outputs[source] = tmp_path / f"from-{source.name}"
        result = run_tool("tools.make_shards", "--train", str(source), "--out", str(out), "--no-progress", check=True)
        assert f"rejected train/{wnid}/empty\\xe9.JPEG: empty file" in result.stdout
        manifest = read_manifest(out)
        assert [(n.path, n.reason.split(" (")[0]) for n in manifest.rejected] == [
            (f"{wnid}/empty\\xe9.JPEG", "empty file")
        ]
        urls = [str(out / s.file) for s in manifest.splits["train"].shards]
        paths = {json.loads(s["json"])["path"]: s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)}
        assert paths[f"{wnid}/caf\\xe9.JPEG"] == "caf_xe9" and f"{wnid}/sub\\xff/x.JPEG" in paths
    assert read_manifest(outputs[train]).splits == read_manifest(outputs[archive]).splits
