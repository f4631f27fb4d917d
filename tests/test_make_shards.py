"""The converter end to end: real photographs and bad files in, shards read back by webdataset and DALI."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.classes import imagenet_names, read_class_file
from shards.convert import LOCK_NAME, PROGRESS_NAME, ProgressLog, load_progress
from shards.folder_lock import lock_folder
from shards.inputs import read_val_labels
from shards.manifest import read_manifest, write_manifest
from shards.tar_writer import ShardWriter, encode_sample
from tests.conftest import REPO_ROOT, run_tool, run_with_file_size_limit, subprocess_env
from tests.test_loaders import shards_with_a_broken_jpeg
from tools.make_shards import main as make_shards_main

WDS2IDX = Path(sys.executable).with_name("wds2idx")


def make_real_tree(root: Path, real_photos: dict[str, Path], demo_imagenet: Path, num_classes: int = 40) -> Path:
    """train/<wnid>/<original file> with real photographs (or the generated demo set without them),
    and a flat val/ with a Kaggle-style LOC_val_solution.csv."""
    train, val = root / "train", root / "val"
    if real_photos:
        chosen = sorted(real_photos.items())[:: max(1, len(real_photos) // num_classes)][:num_classes]
        for wnid, photo in chosen:
            (train / wnid).mkdir(parents=True)
            shutil.copy(photo, train / wnid / photo.name)
        val_sources = [(wnid, photo) for wnid, photo in chosen[:10]]
    else:
        shutil.copytree(demo_imagenet / "train", train)
        val_sources = [(d.name, next(d.iterdir())) for d in sorted(train.iterdir())]
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for n, (wnid, photo) in enumerate(val_sources, 1):
        name = f"ILSVRC2012_val_{n:08d}"
        shutil.copy(photo, val / f"{name}.JPEG")
        rows.append(f"{name},{wnid} 1 2 30 40 {wnid} 5 6 70 80")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


def convert(src: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_tool(
        "tools.make_shards",
        "--train",
        str(src / "train"),
        "--val",
        str(src / "val"),
        "--val-labels",
        str(src / "LOC_val_solution.csv"),
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-progress",
        *extra,
        check=check,
    )


def read_with_dali(out: Path, split: str) -> list[tuple[np.ndarray, bytes, dict]]:
    """Decode every sample of a split with DALI's webdataset reader on the CPU, using our index files."""
    from nvidia.dali import fn, pipeline_def, types

    manifest = read_manifest(out)
    shards = manifest.splits[split].shards
    batch_size = 4

    @pipeline_def(batch_size=batch_size, num_threads=2, device_id=None)
    def pipe():
        jpg, cls, meta = fn.readers.webdataset(
            paths=[str(out / s.file) for s in shards],
            index_paths=[str(out / s.index_file) for s in shards],
            ext=["jpg", "cls", "json"],
            missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, meta

    p = pipe()
    p.build()
    total = manifest.splits[split].samples
    samples = []
    while len(samples) < total:
        images, labels, metas = p.run()
        for i in range(batch_size):
            samples.append((np.array(images.at(i)), np.array(labels.at(i)).tobytes(), json.loads(bytes(metas.at(i)))))
    return samples[:total]


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory, real_photos, demo_imagenet):
    root = tmp_path_factory.mktemp("real")
    src = make_real_tree(root / "src", real_photos, demo_imagenet)
    out = root / "shards"
    result = convert(src, out, "--shard-size-mb", "0.5")
    return src, out, result


def test_manifest_lists_classes_splits_and_shards(real_shards):
    src, out, result = real_shards
    manifest = read_manifest(out)
    wnids = sorted(d.name for d in (src / "train").iterdir())
    assert [c.wnid for c in manifest.classes] == wnids
    assert [c.index for c in manifest.classes] == list(range(len(wnids)))
    names = {c.wnid: c.name for c in manifest.classes}
    if "n01440764" in names:
        assert names["n01440764"] == "tench"
    assert all(c.name for c in manifest.classes), "every ImageNet wnid gets its readable name"
    train_files = sum(1 for _ in (src / "train").rglob("*.JPEG"))
    assert manifest.splits["train"].samples == train_files
    assert manifest.splits["val"].samples == len(list((src / "val").iterdir()))
    assert len(manifest.splits["train"].shards) > 1, "0.5 MB shards: the train split spans several"
    for info in manifest.splits.values():
        for shard in info.shards:
            assert (out / shard.file).stat().st_size == shard.bytes
            assert (out / shard.index_file).is_file()
    assert manifest.rejected == []
    assert manifest.options["shard_size_mb"] == 0.5
    assert "train" in result.stdout and "samples" in result.stdout, "closing summary is printed"


def test_shards_are_ustar_with_fixed_headers_and_4_digit_labels(real_shards):
    _, out, _ = real_shards
    manifest = read_manifest(out)
    with tarfile.open(out / manifest.splits["train"].shards[0].file) as tar:
        members = tar.getmembers()
    assert {m.name.split(".", 1)[1] for m in members} == {"cls", "jpg", "json"}
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    assert all(m.name.count(".") == 1 for m in members), "keys contain no dots"


def test_index_files_equal_what_dali_wds2idx_writes(real_shards, tmp_path):
    _, out, _ = real_shards
    manifest = read_manifest(out)
    for shard in manifest.splits["train"].shards[:3] + manifest.splits["val"].shards:
        reference = tmp_path / (shard.file + ".ref.idx")
        subprocess.run([str(WDS2IDX), str(out / shard.file), str(reference)], check=True, capture_output=True)
        assert (out / shard.index_file).read_bytes() == reference.read_bytes(), shard.file


def test_webdataset_library_reads_every_sample_with_its_label(real_shards):
    src, out, _ = real_shards
    manifest = read_manifest(out)
    index_of = {c.wnid: c.index for c in manifest.classes}
    urls = [str(out / s.file) for s in manifest.splits["train"].shards]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert int(sample["cls"].decode()) == index_of[meta["wnid"]]
        assert meta["path"].split("/")[0] == meta["wnid"], "train label is the class folder"
        original = (src / "train" / meta["path"]).read_bytes()
        assert sample["jpg"] == original, "RGB/grayscale JPEGs are stored byte for byte"
        keys.append(sample["__key__"])
    assert len(keys) == len(set(keys)) == manifest.splits["train"].samples


def test_train_is_shuffled_and_val_keeps_sorted_order(real_shards):
    _, out, _ = real_shards
    manifest = read_manifest(out)

    def paths(split):
        urls = [str(out / s.file) for s in manifest.splits[split].shards]
        return [json.loads(s["json"])["path"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]

    train = paths("train")
    assert train != sorted(train)
    val = paths("val")
    assert val == sorted(val)


def test_dali_reads_and_decodes_with_the_written_index(real_shards):
    _, out, _ = real_shards
    manifest = read_manifest(out)
    index_of = {c.wnid: c.index for c in manifest.classes}
    for split in ("train", "val"):
        samples = read_with_dali(out, split)
        assert len(samples) == manifest.splits[split].samples
        for image, label, meta in samples:
            assert image.shape == (meta["height"], meta["width"], 3)
            assert int(label.decode()) == index_of[meta["wnid"]]


def test_val_labels_come_from_the_kaggle_csv(real_shards):
    src, out, _ = real_shards
    wanted = {}
    for line in (src / "LOC_val_solution.csv").read_text().splitlines()[1:]:
        image_id, prediction = line.split(",")
        wanted[image_id + ".JPEG"] = prediction.split()[0]
    manifest = read_manifest(out)
    urls = [str(out / s.file) for s in manifest.splits["val"].shards]
    got = {
        json.loads(s["json"])["path"]: json.loads(s["json"])["wnid"] for s in wds.WebDataset(urls, shardshuffle=False)
    }
    assert got == wanted


def test_same_inputs_give_byte_identical_output(real_shards, tmp_path):
    src, out, _ = real_shards
    again = tmp_path / "again"
    convert(src, again, "--shard-size-mb", "0.5")
    first = sorted(p.name for p in out.iterdir())
    assert first == sorted(p.name for p in again.iterdir())
    for name in first:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_verify_passes_then_catches_a_flipped_byte_and_a_missing_shard(real_shards, tmp_path):
    _, out, _ = real_shards
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    ok = run_tool("tools.verify_shards", str(copy), "--decode")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    manifest = read_manifest(copy)
    flipped = copy / manifest.splits["train"].shards[0].file
    data = bytearray(flipped.read_bytes())
    data[3000] ^= 0xFF
    flipped.write_bytes(bytes(data))
    missing = manifest.splits["train"].shards[1].file
    (copy / missing).unlink()
    bad = run_tool("tools.verify_shards", str(copy))
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert any(line.startswith(flipped.name) and "sha256" in line for line in lines), bad.stdout
    assert f"{missing}: missing" in lines


def test_verify_names_the_sample_with_a_bad_label(tmp_path, demo_imagenet):
    out = tmp_path / "out"
    run_tool(
        "tools.make_shards", "--train", str(demo_imagenet / "train"), "--out", str(out), "--no-progress", check=True
    )
    manifest = read_manifest(out)
    shard = out / manifest.splits["train"].shards[0].file
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        first_cls = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
    patched = bytearray(data)
    patched[first_cls.offset_data : first_cls.offset_data + 4] = b"9999"
    shard.write_bytes(bytes(patched))
    bad = run_tool("tools.verify_shards", str(out))
    key = first_cls.name.split(".")[0]
    assert bad.returncode == 1
    assert f"{shard.name}: sample {key}: label 9999 out of range 0..9" in bad.stdout


def test_verify_names_each_bad_sample_of_a_shard_made_by_another_tool(tmp_path, demo_imagenet):
    """A shard written by other code, listed in the manifest with its true size and checksum: verify
    names each bad sample and what is wrong with it (components, label, metadata; with --decode also
    an image that is not JPEG, here a PNG, which DALI would decode, and one that does not decode),
    one line each, and nothing about the good sample."""
    out = tmp_path / "out"
    run_tool("tools.make_shards", "--train", str(demo_imagenet / "train"), "--out", str(out), "--no-progress",
             check=True)  # fmt: skip
    jpeg = next((demo_imagenet / "train").rglob("*.JPEG")).read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    samples = {
        "good": [("cls", b"0003"), ("jpg", jpeg), ("json", b"{}")],
        "png": [("cls", b"0003"), ("jpg", png.getvalue()), ("json", b"{}")],
        "cut": [("cls", b"0003"), ("jpg", jpeg[: len(jpeg) // 2]), ("json", b"{}")],
        "short": [("cls", b"12"), ("jpg", jpeg), ("json", b"{}")],
        "badjson": [("cls", b"0003"), ("jpg", jpeg), ("json", b"{")],
        "nojson": [("cls", b"0003"), ("jpg", jpeg)],
    }
    writer = ShardWriter(out, "train-000099")
    for key, components in samples.items():
        writer.add(encode_sample(key, components))
    shard = writer.close()
    manifest = read_manifest(out)
    manifest.splits["train"].shards.append(shard)
    manifest.splits["train"].samples += shard.samples
    write_manifest(out, manifest)

    found = {
        "short": "label b'12' is not 4 ASCII digits",
        "badjson": "metadata .json does not parse",
        "nojson": "has components ['cls', 'jpg'], expected ['cls', 'jpg', 'json']",
    }
    decoded = {"png": "image is PNG, not JPEG", "cut": "image does not decode: "}  # then PIL's words
    for flags, expected in (([], found), (["--decode"], found | decoded)):
        result = run_tool("tools.verify_shards", str(out), *flags)
        assert result.returncode == 1
        named = {}
        for line in result.stdout.splitlines():
            if line.startswith(shard.file):
                key, problem = line.removeprefix(f"{shard.file}: sample ").split(": ", 1)
                named.setdefault(key, []).append(problem)
        assert sorted(named) == sorted(expected), result.stdout
        for key, problem in expected.items():
            assert len(named[key]) == 1 and named[key][0].startswith(problem), result.stdout


SIXTEEN_BIT_GRADIENT = np.linspace(0, 65535, 60 * 80).reshape(60, 80).astype(np.uint16)


def write_bad_inputs(train: Path, real_jpeg: bytes) -> dict[str, str]:
    """One class folder of awkward files; returns file name -> expected outcome."""
    folder = train / "n01440764"
    folder.mkdir(parents=True)
    expected = {}

    def save(name, image, outcome, **kw):
        image.save(folder / name, **kw)
        expected[name] = outcome

    rgb = Image.open(io.BytesIO(real_jpeg)).convert("RGB")
    save("cmyk.JPEG", Image.new("CMYK", (64, 48), (0, 200, 30, 10)), "converted", format="JPEG")
    save("png_inside.JPEG", rgb.resize((80, 60)), "converted", format="PNG")
    save("gray16.png", Image.fromarray(SIXTEEN_BIT_GRADIENT), "converted", format="PNG")
    save("progressive.JPEG", rgb, "kept", format="JPEG", progressive=True)
    save("gray.JPEG", rgb.convert("L"), "kept", format="JPEG")
    save("tiny.JPEG", Image.new("RGB", (1, 1), (255, 0, 0)), "kept", format="JPEG")
    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)[None, :, None].repeat(3000, 0).repeat(3, 2)
    save("large.JPEG", Image.fromarray(gradient), "kept", format="JPEG", quality=80)
    for name in ["with space.JPEG", 'quote\'s "double".JPEG', "extra.dots.in.name.JPEG", "ñandú_Ünïcode.JPEG"]:
        save(name, rgb.resize((90, 70)), "kept", format="JPEG")
    save("a b.JPEG", rgb.resize((50, 50)), "kept", format="JPEG")  # same key as the next one
    save("a_b.JPEG", rgb.resize((51, 51)), "kept", format="JPEG")
    (folder / "truncated.JPEG").write_bytes(real_jpeg[: len(real_jpeg) // 2])
    expected["truncated.JPEG"] = "rejected"
    (folder / "empty.JPEG").write_bytes(b"")
    expected["empty.JPEG"] = "rejected"
    (folder / "notes.JPEG").write_text("this is a text file, not a photograph\n")
    expected["notes.JPEG"] = "rejected"
    return expected


def test_bad_inputs_are_reencoded_or_rejected_and_listed(tmp_path, real_photos, demo_imagenet):
    source = next(iter(real_photos.values()), None) or next((demo_imagenet / "train").rglob("*.JPEG"))
    expected = write_bad_inputs(tmp_path / "train", source.read_bytes())
    out = tmp_path / "out"
    result = run_tool(
        "tools.make_shards", "--train", str(tmp_path / "train"), "--out", str(out), "--no-progress", check=True
    )
    manifest = read_manifest(out)
    rejected = {Path(r.path).name: r.reason for r in manifest.rejected}
    converted = {Path(c.path).name: c.reason for c in manifest.converted}
    assert set(rejected) == {n for n, o in expected.items() if o == "rejected"}
    assert rejected["empty.JPEG"].startswith("empty file")
    assert rejected["notes.JPEG"].startswith("not an image")
    assert "truncated" in rejected["truncated.JPEG"]
    assert converted == {
        "cmyk.JPEG": "CMYK JPEG re-encoded as RGB",
        "png_inside.JPEG": "PNG content re-encoded as JPEG",
        "gray16.png": "PNG content re-encoded as JPEG",
    }
    assert "3 rejected" in result.stdout and "truncated.JPEG" in result.stdout

    stored = {}
    urls = [str(out / s.file) for s in manifest.splits["train"].shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        stored[Path(meta["path"]).name] = (sample["__key__"], Image.open(io.BytesIO(sample["jpg"])))
    assert set(stored) == {n for n, o in expected.items() if o != "rejected"}
    assert stored["cmyk.JPEG"][1].mode == "RGB" and stored["cmyk.JPEG"][1].format == "JPEG"
    assert stored["png_inside.JPEG"][1].format == "JPEG"
    # Scaled to 8 bits as DALI decodes such a PNG, not clipped white by Pillow's convert("RGB").
    gray16 = np.asarray(stored["gray16.png"][1].convert("L"), dtype=np.float64)
    assert np.abs(gray16 - (SIXTEEN_BIT_GRADIENT + 128) // 257).mean() < 2
    assert stored["gray.JPEG"][1].mode == "L"
    assert stored["large.JPEG"][1].size == (4000, 3000)
    keys = [key for key, _ in stored.values()]
    assert len(set(keys)) == len(keys)
    assert all(k.replace("_", "").replace("-", "").isalnum() and k.isascii() for k in keys), keys
    assert stored["a b.JPEG"][0] == "a_b" and stored["a_b.JPEG"][0] == "a_b-2"
    decoded = read_with_dali(out, "train")
    assert len(decoded) == len(stored)
    assert all(image.shape[2] == 3 for image, _, _ in decoded)


def test_a_jpeg_header_dali_cannot_parse_is_reencoded_and_verify_names_one(tmp_path, demo_imagenet):
    """Stray bytes between a JPEG's markers: PIL's libjpeg decodes past them with a warning, DALI 2.4
    cannot parse the header (and crashes on it in a batch of 32 or more). The converter stores such
    an image re-encoded; verify_shards names one found in a shard made otherwise."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    victim = sorted(train.rglob("*.JPEG"))[0]
    jpeg = victim.read_bytes()
    scan = jpeg.rindex(b"\xff\xda")
    victim.write_bytes(jpeg[:scan] + b"\x00stray" * 20 + jpeg[scan:])
    Image.open(victim).load()  # PIL accepts it
    out = tmp_path / "out"
    run_tool("tools.make_shards", "--train", str(train), "--out", str(out), "--no-progress", check=True)
    converted = {Path(c.path).name: c.reason for c in read_manifest(out).converted}
    assert converted[victim.name].startswith("JPEG re-encoded: its header cannot be parsed by DALI (JPEG marker")
    assert run_tool("tools.verify_shards", str(out)).returncode == 0
    assert len(read_with_dali(out, "train")) == read_manifest(out).splits["train"].samples

    shards, tar, bad_key = shards_with_a_broken_jpeg(out, tmp_path / "broken", "train", damage="header")
    result = run_tool("tools.verify_shards", str(shards))
    assert result.returncode == 1
    assert f"{tar}: sample {bad_key}: JPEG header that DALI cannot parse: JPEG marker expected" in result.stdout


def test_strict_exits_nonzero_after_finishing(tmp_path, demo_imagenet):
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    broken = next(train.iterdir()) / "broken.JPEG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    result = run_tool("tools.make_shards", "--train", str(train), "--out", str(tmp_path / "o"), "--strict")
    assert result.returncode == 1
    assert "--strict" in result.stderr
    assert (tmp_path / "o" / "manifest.json").is_file(), "the run completes before --strict fails it"


def test_links_to_nothing_and_pipes_are_rejected_and_listed_not_dropped_or_waited_on(tmp_path, demo_imagenet):
    """A link whose target is gone, or a named pipe (reading one would block), in a class folder or
    a flat val folder: the run goes on without it and lists it with the reason, as any other file it
    cannot use (before: the link stopped the whole run, in flat val it was dropped silently)."""
    train, val = tmp_path / "train", tmp_path / "val"
    shutil.copytree(demo_imagenet / "train", train)
    shutil.copytree(demo_imagenet / "val", val)
    wnid = sorted(p.name for p in train.iterdir())[0]
    (train / wnid / "gone.JPEG").symlink_to(tmp_path / "nothing-here.JPEG")
    os.mkfifo(train / wnid / "pipe.JPEG")
    (val / "ILSVRC2012_val_99999999.JPEG").symlink_to(tmp_path / "nothing-here.JPEG")
    os.mkfifo(val / "ILSVRC2012_val_99999998.JPEG")
    out = tmp_path / "out"
    args = ["--train", str(train), "--val", str(val), "--val-labels", str(demo_imagenet / "val_labels.txt")]
    result = run_tool("tools.make_shards", *args, "--out", str(out), "--no-progress", timeout=120, check=True)
    expected = {
        ("train", f"{wnid}/gone.JPEG", "cannot be read (No such file or directory)"),
        ("train", f"{wnid}/pipe.JPEG", "not a regular file"),
        ("val", "ILSVRC2012_val_99999999.JPEG", "cannot be read (No such file or directory)"),
        ("val", "ILSVRC2012_val_99999998.JPEG", "not a regular file"),
    }
    manifest = read_manifest(out)
    assert {(r.split, r.path, r.reason) for r in manifest.rejected} == expected
    for split, path, reason in expected:
        assert f"rejected {split}/{path}: {reason}" in result.stdout
    for split in ("train", "val"):
        images = sum(1 for p in (demo_imagenet / split).rglob("*.JPEG"))
        assert manifest.splits[split].samples == images


def dry_run(*args: str, capsys) -> tuple[int, str]:
    code = make_shards_main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out + err


def test_a_dry_run_reports_what_a_run_writes_and_writes_nothing(tmp_path, demo_imagenet, capsys):
    """--dry-run's counts are those of the run that follows, it names what --out holds, it reports
    label errors as a run does, and it leaves --out as it found it."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    (train / "notes.txt").write_text("not an image")  # rejected at scan
    out = tmp_path / "out"
    args = ["--train", str(train), "--val", str(demo_imagenet / "val"), "--val-labels",
            str(demo_imagenet / "val_labels.txt"), "--out", str(out), "--shard-size-mb", "0.05"]  # fmt: skip
    code, text = dry_run(*args, capsys=capsys)
    assert code == 0 and not out.exists(), text
    assert "rejected train/notes.txt: file outside any class folder" in text
    assert f"--out {out}: holds no conversion; a run would write every shard" in text
    split_line = r"^  (\w+)\s*: (\d+) images, [\d.]+ MB of source files, (\d+) shards?; (\d+) rejected at scan"
    planned = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(split_line, text, re.M)}
    run_tool("tools.make_shards", *args, "--no-progress", check=True)
    manifest = read_manifest(out)
    for split, info in manifest.splits.items():
        rejected = sum(1 for r in manifest.rejected if r.split == split)
        assert planned[split] == (info.samples, len(info.shards), rejected), split
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "holds this conversion, complete; a run would do nothing" in dry_run(*args, capsys=capsys)[1]
    _, text = dry_run(*args[:-1], "0.1", capsys=capsys)
    assert "holds a conversion made with other arguments or inputs; a run would stop (use --overwrite)" in text
    assert "with --overwrite a run would remove them" in dry_run(*args[:-1], "0.1", "--overwrite", capsys=capsys)[1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a dry run changes nothing, --overwrite or not"

    labels = tmp_path / "labels.txt"
    lines = (demo_imagenet / "val_labels.txt").read_text().splitlines()
    labels.write_text("\n".join(lines[:-1] + [lines[-1].split()[0] + " n99999999"]) + "\n")
    code, text = dry_run(*args[:5], str(labels), "--out", str(tmp_path / "other"), capsys=capsys)
    assert code == 2 and "n99999999" in text and "labels.txt" in text
    assert not (tmp_path / "other").exists()


def test_label_errors_stop_before_any_shard_is_written(tmp_path, demo_imagenet):
    labels = (demo_imagenet / "val_labels.txt").read_text().splitlines()
    bad_wnid = tmp_path / "bad_wnid.txt"
    bad_wnid.write_text("\n".join(labels[:-1] + [labels[-1].split()[0] + " n99999999"]) + "\n")
    out = tmp_path / "out"
    args = ["--train", str(demo_imagenet / "train"), "--val", str(demo_imagenet / "val"), "--out", str(out)]
    result = run_tool("tools.make_shards", *args, "--val-labels", str(bad_wnid))
    assert result.returncode == 2
    assert "n99999999" in result.stderr and "bad_wnid.txt" in result.stderr
    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join(labels[:-1]) + "\n")
    result = run_tool("tools.make_shards", *args, "--val-labels", str(missing))
    assert result.returncode == 2
    assert "no label" in result.stderr and labels[-1].split()[0] in result.stderr
    assert not list(out.glob("*.tar"))


def test_val_label_files_are_read_line_by_line_and_a_bad_line_is_named(tmp_path):
    """Kaggle's CSV and 'filename wnid' lines (blank lines and # comments skipped): a malformed row
    names the file and its line number; a file of no labels is an error, not an empty split."""
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n\n")
    assert read_val_labels(kaggle) == {"ILSVRC2012_val_00000001": "n01751748"}
    two_rows = "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\nILSVRC2012_val_2\n"
    expected = f"{kaggle}:3: expected 'ImageId,PredictionString', got ['ILSVRC2012_val_2']"
    assert_refused(read_val_labels, kaggle, two_rows, expected)
    plain = tmp_path / "labels.txt"
    plain.write_text("# file wnid\n\nILSVRC2012_val_00000001.JPEG n01751748\nval/b.jpg n01440764\n")
    assert read_val_labels(plain) == {"ILSVRC2012_val_00000001": "n01751748", "b": "n01440764"}
    extra = "a.JPEG n01751748\nb.JPEG n01440764 extra\n"
    assert_refused(read_val_labels, plain, extra, f"{plain}:2: expected '<filename> <wnid>'")
    assert_refused(read_val_labels, plain, "# nothing but a comment\n", f"{plain}: no labels found")


def assert_refused(read, path: Path, text: str, message: str) -> None:
    """`read(path)` of a file holding `text` raises a ValueError whose message holds `message`."""
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        read(path)


@pytest.mark.parametrize("layout", ["absent", "no class folders", "an unlisted class"])
def test_a_train_folder_of_another_layout_is_named(tmp_path, capsys, layout):
    """--train must be a folder of class folders (those of --classes, when given): otherwise the
    error names the folder, exit 2, and --out is not created."""
    train = tmp_path / "train"
    extra = []
    if layout == "no class folders":
        train.mkdir()
        (train / "photo.JPEG").write_bytes(b"")
        message = f"{train}: no class folders found (expected {train}/<wnid>/*.JPEG)"
    elif layout == "an unlisted class":
        for wnid in ("n01440764", "n01443537"):
            (train / wnid).mkdir(parents=True)
        (tmp_path / "classes.txt").write_text("n01440764\n")
        extra = ["--classes", str(tmp_path / "classes.txt")]
        message = f"{train / 'n01443537'}: folder 'n01443537' is not one of the 1 known classes"
    else:
        message = f"input folder not found: {train}"
    assert make_shards_main(["--train", str(train), "--out", str(tmp_path / "out"), "--no-progress", *extra]) == 2
    assert f"make_shards: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_classes_file_listing_a_class_twice_or_none_is_refused(tmp_path):
    """--classes FILE: one wnid per line, a name after it optional; a wnid listed twice would give
    two labels one class, and a file of none would give no classes: both are errors naming the line."""
    classes = tmp_path / "classes.txt"
    classes.write_text("# wnid name\nn01440764 tench, Tinca tinca\n\nn01443537\tgoldfish\nn01484850\n")
    assert read_class_file(classes) == [("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish"),
                                        ("n01484850", None)]  # fmt: skip
    twice = "n01440764 tench\nn01443537 goldfish\nn01440764 tench again\n"
    assert_refused(read_class_file, classes, twice, f"{classes}:3: class 'n01440764' listed twice")
    assert_refused(read_class_file, classes, "# no classes\n\n", f"{classes}: no classes listed")


@pytest.mark.parametrize("read, option", [(read_class_file, "--classes"), (read_val_labels, "--val-labels")])
def test_text_files_with_a_byte_order_mark_are_read_and_other_encodings_named(tmp_path, read, option):
    """Saved by a Windows editor, the file starts with a UTF-8 byte-order mark, which joined the first
    wnid (`folder 'n01440764' is not one of the known classes`); in Latin-1, or a folder, or absent,
    it stopped the converter with a message that named neither the option nor the file."""
    text = tmp_path / "text.txt"
    line = "n01440764 tench\n" if option == "--classes" else "a.JPEG n01440764\n"
    text.write_bytes(b"\xef\xbb\xbf" + line.encode())
    assert read(text) == ([("n01440764", "tench")] if option == "--classes" else {"a": "n01440764"})
    text.write_bytes(line.encode()[:-1] + b" caf\xe9\n")
    with pytest.raises(ValueError, match=re.escape(f"{option} {text}: not UTF-8 text (byte 0xe9 at offset ")):
        read(text)
    absent = tmp_path / "absent.txt"
    with pytest.raises(ValueError, match=re.escape(f"{option} {absent}: cannot be read (No such file or directory)")):
        read(absent)
    if option == "--classes":  # a folder given as --val-labels is read as a devkit (tests/test_devkit.py)
        with pytest.raises(ValueError, match=re.escape(f"{option} {tmp_path}: cannot be read (Is a directory)")):
            read(tmp_path)


@pytest.mark.parametrize(
    "option, message",
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--shard-size-mb", "0"], "--shard-size-mb must be positive"),
        (["--shard-size-mb", "nan"], "--shard-size-mb must be positive (a finite number of MB), got nan"),
        (["--quality", "101"], "--quality must be between 1 and 100"),
        (["--max-short-side", "0"], "--max-short-side must be at least 1"),
    ],
)
def test_make_shards_options_out_of_range_are_usage_errors(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_info:
        make_shards_main(["--train", str(tmp_path), "--out", str(tmp_path / "out"), *option])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("found", ["a damaged manifest", "shards of an unknown conversion", "another unfinished one"])
def test_an_output_folder_holding_something_else_is_left_alone(tmp_path, demo_imagenet, capsys, found):
    """What --out already holds and this run cannot account for (a manifest it cannot read, shards
    without a manifest or progress file, an unfinished conversion of other arguments) stops the run
    with exit 2 naming it, every file untouched; --overwrite replaces it."""
    out = tmp_path / "out"
    out.mkdir()
    if found == "a damaged manifest":
        (out / "manifest.json").write_text("{")
        message = "manifest.json: not a valid manifest"
    elif found == "shards of an unknown conversion":
        (out / "train-000000.tar").write_bytes(b"someone else's")
        message = f"{out} already holds shards (train-000000.tar, ...) from an unknown conversion; use --overwrite"
    else:
        (out / PROGRESS_NAME).write_text(json.dumps({"options": {"seed": 7}}) + "\n")
        message = f"{out} holds an unfinished conversion with other arguments or inputs; use --overwrite to restart"
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    args = ["--train", str(demo_imagenet / "train"), "--out", str(out), "--workers", "1", "--no-progress"]
    assert make_shards_main(args) == 2
    assert message in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert make_shards_main([*args, "--overwrite"]) == 0
    assert read_manifest(out).splits["train"].samples > 0


def test_a_split_that_would_be_empty_stops_before_any_shard_is_written(tmp_path, demo_imagenet):
    out = tmp_path / "out"
    train, val = demo_imagenet / "train", demo_imagenet / "val"
    flat_val_without_labels = run_tool("tools.make_shards", "--train", str(train), "--val", str(val), "--out", str(out))
    assert flat_val_without_labels.returncode == 2
    assert f"{val}: no class folders" in flat_val_without_labels.stderr
    assert "--val-labels" in flat_val_without_labels.stderr

    labels = demo_imagenet / "val_labels.txt"
    foldered_val_with_labels = run_tool(
        "tools.make_shards", "--train", str(train), "--val", str(train), "--val-labels", str(labels), "--out", str(out)
    )
    assert foldered_val_with_labels.returncode == 2
    assert f"{train}: no image files directly in it" in foldered_val_with_labels.stderr

    empty_classes = tmp_path / "empty"
    for wnid in sorted(p.name for p in train.iterdir())[:3]:
        (empty_classes / wnid).mkdir(parents=True)
    no_files = run_tool("tools.make_shards", "--train", str(empty_classes), "--out", str(out))
    assert no_files.returncode == 2
    assert f"{empty_classes}: no files in its 3 class folder(s)" in no_files.stderr
    assert not out.exists()


def test_class_index_folders_label_numbered_folders_by_their_numbers(tmp_path, demo_imagenet):
    """ImageNetV2's layout, folders 0-999 named by class index: sorted as names they would mislabel
    (ImageFolder's trap), so without --class-index-folders the run stops; with it folder i holds class i
    of ImageNet-1k's sorted wnids, or of --classes."""
    imagenet = sorted(imagenet_names())
    photos = sorted((demo_imagenet / "train").rglob("*.JPEG"))
    numbers = [0, 1, 2, 7, 10, 11, 42, 100, 250, 500, 999]
    numbered = tmp_path / "imagenetv2"
    for n, photo in zip(numbers, photos, strict=False):
        (numbered / str(n)).mkdir(parents=True)
        shutil.copy(photo, numbered / str(n) / f"{n}-{photo.name}")

    refused = run_tool("tools.make_shards", "--val", str(numbered), "--out", str(tmp_path / "refused"))
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    assert "folder '10' would be class 2, not class 10: give --class-index-folders" in refused.stderr

    def labels_by_folder(out: Path) -> list[tuple[int, int, str]]:
        urls = [str(out / s.file) for s in read_manifest(out).splits["val"].shards]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        rows = [(int(s["cls"]), json.loads(s["json"])) for s in samples]
        return sorted((label, int(meta["path"].split("/")[0]), meta["wnid"]) for label, meta in rows)

    args = ["--val", str(numbered), "--class-index-folders", "--workers", "2", "--no-progress"]
    run_tool("tools.make_shards", *args, "--out", str(tmp_path / "v2"), check=True)
    assert [c.wnid for c in read_manifest(tmp_path / "v2").classes] == imagenet
    assert labels_by_folder(tmp_path / "v2") == [(n, n, imagenet[n]) for n in numbers]
    run_tool("tools.verify_shards", str(tmp_path / "v2"), "--decode", check=True)

    reversed_file = tmp_path / "reversed.txt"
    reversed_file.write_text("".join(f"{wnid}\n" for wnid in reversed(imagenet)))
    run_tool("tools.make_shards", *args, "--classes", str(reversed_file), "--out", str(tmp_path / "rev"), check=True)
    assert labels_by_folder(tmp_path / "rev") == [(n, n, imagenet[999 - n]) for n in numbers]

    (numbered / "1000").mkdir()
    beyond = run_tool("tools.make_shards", *args, "--out", str(tmp_path / "beyond"))
    assert beyond.returncode == 2 and "folder '1000' is not a class index from 0 to 999" in beyond.stderr
    labels = demo_imagenet / "val_labels.txt"
    flat = run_tool("tools.make_shards", "--val", str(demo_imagenet / "val"), "--val-labels", str(labels),
                    "--class-index-folders", "--out", str(tmp_path / "flat"))  # fmt: skip
    assert flat.returncode == 2 and "--class-index-folders names the class folders of a foldered" in flat.stderr


def test_other_arguments_on_existing_output_need_overwrite(tmp_path, demo_imagenet):
    out = tmp_path / "out"
    base = ["--train", str(demo_imagenet / "train"), "--out", str(out), "--no-progress"]
    run_tool("tools.make_shards", *base, check=True)
    again = run_tool("tools.make_shards", *base, check=True)
    assert "already complete" in again.stdout
    other = run_tool("tools.make_shards", *base, "--seed", "7")
    assert other.returncode == 2 and "--overwrite" in other.stderr
    run_tool("tools.make_shards", *base, "--seed", "7", "--overwrite", check=True)
    assert read_manifest(out).options["seed"] == 7


def test_max_short_side_reencodes_large_images(tmp_path, demo_imagenet):
    out = tmp_path / "out"
    run_tool(
        "tools.make_shards", "--train", str(demo_imagenet / "train"), "--out", str(out), "--max-short-side", "64",
        "--quality", "80", "--no-progress", check=True,
    )  # fmt: skip
    manifest = read_manifest(out)
    assert manifest.splits["train"].resized == manifest.splits["train"].samples
    urls = [str(out / s.file) for s in manifest.splits["train"].shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image = Image.open(io.BytesIO(sample["jpg"]))
        meta = json.loads(sample["json"])
        assert min(image.size) == 64 and list(image.size) == [meta["width"], meta["height"]]


def test_train_max_short_side_shrinks_train_only(tmp_path, demo_imagenet):
    """Train stored small, val byte for byte; the manifest says so per split, and the same command
    again finds the output complete."""
    out = tmp_path / "out"
    args = [
        "--train", str(demo_imagenet / "train"), "--val", str(demo_imagenet / "train"), "--out", str(out),
        "--train-max-short-side", "48", "--no-progress",
    ]  # fmt: skip
    first = run_tool("tools.make_shards", *args, check=True)
    assert "resized to short side 48" in first.stdout
    manifest = read_manifest(out)
    assert (manifest.splits["train"].max_short_side, manifest.splits["val"].max_short_side) == (48, None)
    assert manifest.splits["train"].resized == manifest.splits["train"].samples and manifest.splits["val"].resized == 0
    for split in ("train", "val"):
        urls = [str(out / s.file) for s in manifest.splits[split].shards]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            if split == "train":
                assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 48
            else:
                assert sample["jpg"] == (demo_imagenet / "train" / json.loads(sample["json"])["path"]).read_bytes()
    assert "already complete" in run_tool("tools.make_shards", *args, check=True).stdout
    bad = run_tool("tools.make_shards", *args[:-3], "--val-max-short-side", "0")
    assert bad.returncode == 2 and "--val-max-short-side must be at least 1" in bad.stderr


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path, demo_imagenet):
    out = tmp_path / "shards"
    out.write_text("not a folder")
    result = run_tool("tools.make_shards", "--train", str(demo_imagenet / "train"), "--out", str(out))
    assert result.returncode == 2 and f"--out {out}: exists and is not a directory" in result.stderr
    assert out.read_text() == "not a folder"


def test_an_output_inside_an_input_folder_is_refused_before_any_work(tmp_path, demo_imagenet):
    """--out within a foldered --train (or a --val folder) would be scanned by a rerun: its shards a
    class of their own, or loose files among the inputs."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    before = sorted(p.relative_to(train) for p in train.rglob("*"))
    for out, split in ((train / "shards", "--train"), (train, "--train"), (tmp_path / "val-out", "--val")):
        inputs = ("--val", str(tmp_path)) if split == "--val" else ("--train", str(train))
        result = run_tool("tools.make_shards", *inputs, "--out", str(out))
        assert result.returncode == 2 and f"--out {out} is inside {split} " in result.stderr, result.stderr
    assert sorted(p.relative_to(train) for p in train.rglob("*")) == before


def test_train_raw_pixels_stores_each_train_image_as_its_pixels(tmp_path, demo_imagenet):
    """--train-raw-pixels: train samples hold an RGB PPM of the shrunk image (the pixels PIL decodes
    from what would otherwise be re-encoded), val stays JPEG; verify --decode accepts both, and the
    option needs a short-side limit."""
    out = tmp_path / "out"
    args = [
        "--train", str(demo_imagenet / "train"), "--val", str(demo_imagenet / "train"), "--out", str(out),
        "--train-raw-pixels", "--train-max-short-side", "40", "--no-progress",
    ]  # fmt: skip
    first = run_tool("tools.make_shards", *args, check=True)
    assert "stored as raw pixels (PPM)" in first.stdout
    manifest = read_manifest(out)
    assert (manifest.splits["train"].image_ext, manifest.splits["val"].image_ext) == ("ppm", "jpg")
    urls = [str(out / s.file) for s in manifest.splits["train"].shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert "jpg" not in sample
        stored = Image.open(io.BytesIO(sample["ppm"]))
        assert stored.format == "PPM" and stored.mode == "RGB" and min(stored.size) == 40
        with Image.open(demo_imagenet / "train" / json.loads(sample["json"])["path"]) as source:
            scale = 40 / min(source.size)
            size = (max(1, round(source.width * scale)), max(1, round(source.height * scale)))
            expected = source.convert("RGB").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        assert stored.tobytes() == expected.tobytes()
    assert run_tool("tools.verify_shards", str(out), "--decode").returncode == 0
    assert "already complete" in run_tool("tools.make_shards", *args, check=True).stdout
    unlimited = run_tool("tools.make_shards", *args[:-3], "--no-progress")
    assert unlimited.returncode == 2 and "--train-raw-pixels needs --train-max-short-side" in unlimited.stderr


def test_manifest_of_one_limit_for_both_splits_still_reads(tmp_path, demo_imagenet):
    """Manifests written before per-split limits hold --max-short-side in their options only."""
    out = tmp_path / "out"
    run_tool(
        "tools.make_shards", "--train", str(demo_imagenet / "train"), "--out", str(out), "--max-short-side", "64",
        "--no-progress", check=True,
    )  # fmt: skip
    data = json.loads((out / "manifest.json").read_text())
    del data["splits"]["train"]["max_short_side"]
    (out / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(out).splits["train"].max_short_side == 64


def signal_after_two_shards(args: list[str], out: Path, signum: int) -> tuple[int, str]:
    """Run tools.make_shards with `args` into `out` in a process group of its own, and send `signum`
    to the whole group (as a terminal's Ctrl-C or a scheduler's kill reaches a job) once its second
    shard is written. Returns its exit status and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.make_shards", *args, "--out", str(out)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "train-000001.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signum)
    stderr = process.communicate(timeout=60)[1]
    return process.returncode, stderr


def test_resume_after_kill_gives_the_uninterrupted_result(tmp_path, demo_imagenet):
    reference = tmp_path / "reference"
    base = ["--train", str(demo_imagenet / "train"), "--shard-size-mb", "0.05", "--workers", "1", "--no-progress"]
    run_tool("tools.make_shards", *base, "--out", str(reference), check=True)
    assert len(read_manifest(reference).splits["train"].shards) >= 4

    killed = tmp_path / "killed"
    signal_after_two_shards(base, killed, signal.SIGKILL)
    assert not (killed / "manifest.json").exists(), "killed before the end"
    log_path = killed / PROGRESS_NAME
    with open(log_path, "a") as log:
        log.write('{"split": "train", "num')  # what a kill in the middle of an append leaves
    # A second run that appends and is killed again must leave a log a third run can read.
    options = json.loads(log_path.read_text().splitlines()[0])["options"]
    committed = load_progress(killed, options)
    ProgressLog(log_path, options).append(next(iter(committed.values())))
    assert load_progress(killed, options) == committed
    shards = len(read_manifest(reference).splits["train"].shards)
    before = {p.name: p.read_bytes() for p in killed.iterdir()}
    planned = run_tool("tools.make_shards", *base, "--out", str(killed), "--dry-run", check=True)
    assert (
        f"holds {len(committed)} of the {shards} shards of this conversion; a run would write the rest"
        in planned.stdout
    )
    assert {p.name: p.read_bytes() for p in killed.iterdir()} == before
    finished = run_tool("tools.make_shards", *base, "--out", str(killed), check=True)
    assert "resumed" in finished.stdout
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in killed.iterdir())
    for name in names:
        assert (reference / name).read_bytes() == (killed / name).read_bytes(), name


def test_classes_file_sets_order_and_names(tmp_path, demo_imagenet):
    wnids = sorted(p.name for p in (demo_imagenet / "train").iterdir())
    reordered = list(reversed(wnids))
    classes = tmp_path / "classes.txt"
    # A name after a tab, after a space (Kaggle's LOC_synset_mapping.txt), or none.
    lines = [f"{w}\tclass {i}\n" if i % 3 == 1 else f"{w} class {i}, kaggle\n" if i % 3 == 2 else f"{w}\n"
             for i, w in enumerate(reordered)]  # fmt: skip
    classes.write_text("".join(lines))
    out = tmp_path / "out"
    run_tool(
        "tools.make_shards", "--train", str(demo_imagenet / "train"), "--classes", str(classes), "--out", str(out),
        "--no-progress", check=True,
    )  # fmt: skip
    manifest = read_manifest(out)
    assert [c.wnid for c in manifest.classes] == reordered
    assert manifest.classes[1].name == "class 1"
    assert manifest.classes[2].name == "class 2, kaggle"
    assert manifest.classes[0].name, "a wnid without a name in the file gets ImageNet's readable name"
    urls = [str(out / s.file) for s in manifest.splits["train"].shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert int(sample["cls"]) == reordered.index(json.loads(sample["json"])["wnid"])


def test_verify_catches_a_truncated_shard_and_a_wrong_index(tmp_path, demo_imagenet):
    out = tmp_path / "out"
    run_tool("tools.make_shards", "--train", str(demo_imagenet / "train"), "--out", str(out), "--shard-size-mb",
             "0.5", "--no-progress", check=True)  # fmt: skip
    first, second = read_manifest(out).splits["train"].shards[:2]
    with open(out / first.file, "r+b") as f:
        f.truncate(first.bytes // 2)
    lines = (out / second.index_file).read_text().splitlines()
    (out / second.index_file).write_text("\n".join(lines[:1] + [lines[2], lines[1]] + lines[3:]) + "\n")
    bad = run_tool("tools.verify_shards", str(out))
    assert bad.returncode == 1
    assert f"{first.file}: {first.bytes // 2} bytes, manifest says {first.bytes}" in bad.stdout
    assert f"{first.file}: sha256 differs" in bad.stdout
    assert f"{second.index_file}: does not match {second.file}" in bad.stdout


def test_a_second_conversion_into_the_same_output_is_refused_while_the_first_runs(tmp_path, demo_imagenet):
    """Two converters writing one --out (a command started twice) removed each other's unfinished
    shards and stopped with `No such file or directory: .../train-000007.tar.tmp`, or wrote into the
    same temporary files. The first holds a lock (here this test process), the second is refused
    before it touches anything."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["--train", str(demo_imagenet / "train"), "--out", str(out), "--no-progress"]
    with lock_folder(out, LOCK_NAME):
        (out / "train-000000.tar.tmp").write_bytes(b"the first conversion's unfinished shard")
        second = run_tool("tools.make_shards", *args)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"--out {out} is in use by another make_shards (pid {os.getpid()} on " in second.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "train-000000.tar.tmp"]
    (out / "train-000000.tar.tmp").unlink()
    run_tool("tools.make_shards", *args, check=True)
    assert read_manifest(out).splits["train"].samples > 0


def test_ctrl_c_stops_in_one_line_and_leaves_no_unfinished_shard(tmp_path, demo_imagenet):
    """Ctrl-C reaches the whole process group: the workers used to print a KeyboardInterrupt traceback
    each, the main process another, and unfinished shards stayed as *.tmp files until a rerun."""
    out = tmp_path / "out"
    args = ["--train", str(demo_imagenet / "train"), "--shard-size-mb", "0.05", "--workers", "2", "--no-progress"]
    returncode, stderr = signal_after_two_shards(args, out, signal.SIGINT)
    assert not (out / "manifest.json").exists(), "interrupted before the end"
    assert returncode == 130, stderr
    expected = "make_shards: interrupted; the finished shards are kept: run the same command again to resume\n"
    assert stderr == expected
    assert not list(out.glob("*.tmp")) and (out / PROGRESS_NAME).exists()
    assert "resumed" in run_tool("tools.make_shards", *args, "--out", str(out), check=True).stdout


def test_a_full_disk_is_named_leaves_no_unfinished_shard_and_the_rerun_finishes(tmp_path, demo_imagenet):
    """Files may not grow past 30 kB (RLIMIT_FSIZE: writes then fail as on a full disk, with EFBIG):
    exit 3 naming the output folder, no temporary file holding on to space, and the same command
    finishes once there is room."""
    base = ["--train", str(demo_imagenet / "train"), "--shard-size-mb", "0.05", "--workers", "1", "--no-progress"]
    out = tmp_path / "out"

    full = run_with_file_size_limit(30_000, "-m", "tools.make_shards", *base, "--out", str(out))
    assert full.returncode == 3, full.stdout + full.stderr
    assert f"File too large (writing shards to {out}); run the same command again to resume" in full.stderr
    assert "Traceback" not in full.stderr
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    finished = run_tool("tools.make_shards", *base, "--out", str(out), check=True)
    assert read_manifest(out).splits["train"].samples > 0, finished.stdout


def test_classes_still_packed_as_tars_stop_the_run(tmp_path, demo_imagenet):
    """ILSVRC2012_img_train.tar unpacks to one tar per class; a class left packed is not dropped silently."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    packed = sorted(train.iterdir())[-2:]
    for folder in packed:
        with tarfile.open(train / f"{folder.name}.tar", "w") as tar:
            for image in sorted(folder.iterdir()):
                tar.add(image, arcname=image.name)
        shutil.rmtree(folder)
    out = tmp_path / "out"
    for extra in ([], ["--classes", str(tmp_path / "classes.txt")]):
        (tmp_path / "classes.txt").write_text(
            "".join(f"{d.name}\n" for d in sorted(demo_imagenet.joinpath("train").iterdir()))
        )
        result = run_tool("tools.make_shards", "--train", str(train), "--out", str(out), *extra)
        assert result.returncode == 2
        assert f"{train}: 2 class(es) still packed as tar files" in result.stderr
        assert f"{packed[0].name}.tar" in result.stderr and "tar xf" in result.stderr
        assert not out.exists() or not list(out.glob("*.tar"))


def test_a_class_without_train_images_stops_the_run(tmp_path, demo_imagenet):
    """An empty class folder (a copy cut short), or a --classes line with no folder, is not trained on blind."""
    train = tmp_path / "train"
    shutil.copytree(demo_imagenet / "train", train)
    wnids = sorted(d.name for d in train.iterdir())
    for image in (train / wnids[3]).iterdir():
        image.unlink()
    out = tmp_path / "out"
    result = run_tool("tools.make_shards", "--train", str(train), "--out", str(out))
    assert result.returncode == 2
    assert f"{train}: no images for 1 of the {len(wnids)} classes, e.g. ['{wnids[3]}']" in result.stderr
    (train / wnids[3]).rmdir()
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{w}\n" for w in wnids))
    result = run_tool("tools.make_shards", "--train", str(train), "--classes", str(classes), "--out", str(out))
    assert result.returncode == 2
    assert f"e.g. ['{wnids[3]}']" in result.stderr
    assert not out.exists() or not list(out.glob("*.tar"))


def test_more_than_ten_thousand_classes_get_five_digit_labels(tmp_path):
    """ImageNet-21k-sized class lists: labels widen to 5 digits for the whole split (DALI reads a
    fixed width), verify_shards accepts them, and a DALI loader reads label 10000 back."""
    from pipeline.loader import LoaderConfig, create_loader

    train = tmp_path / "train"
    wnids = [f"n{i:08d}" for i in range(10_001)]
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 60)).save(buffer, format="JPEG")
    for wnid in wnids:
        (train / wnid).mkdir(parents=True)
        (train / wnid / f"{wnid}_1.JPEG").write_bytes(buffer.getvalue())
    out = tmp_path / "out"
    run_tool(
        "tools.make_shards", "--train", str(train), "--out", str(out), "--workers", "2", "--no-progress", check=True
    )
    labels = []
    for tar_path in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            labels += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")]
    assert len(labels) == 10_001 and {len(label) for label in labels} == {5}
    assert sorted(int(label) for label in labels) == list(range(10_001))
    run_tool("tools.verify_shards", str(out), check=True)

    settings = LoaderConfig(backend="dali-cpu", batch_size=10_001, workers=2, image_size=16, dtype="float32")
    loader = create_loader(str(out), "train", settings)
    _, read = next(iter(loader))
    loader.close()
    assert sorted(read.tolist()) == list(range(10_001))


# Run by the test below in a child process whose own SIGTERM handler returns, as a job runner's or a
# training loop's does. Nothing sends the caller SIGTERM: the line it prints comes from a Pool worker
# that inherited the handler, so it was not ended when its Pool was.
CALLER_WITH_A_SIGTERM_HANDLER = """
import os, signal, sys
from pathlib import Path
def on_sigterm(signum, frame):
    print(f"the caller's SIGTERM handler ran in {os.getpid()}", flush=True)
signal.signal(signal.SIGTERM, on_sigterm)
from shards.worker_pool import worker_pool
from tools.make_demo_data import pack_train_archive
from tools.make_shards import main as make_shards
from tools.verify_shards import main as verify_shards
train, work = Path(sys.argv[1]), Path(sys.argv[2])
with worker_pool(2) as pool:
    assert set(pool.map(signal.getsignal, [signal.SIGTERM] * 8, chunksize=1)) == {signal.SIG_DFL}
options = ["--shard-size-mb", "0.05", "--workers", "2", "--no-progress"]
assert make_shards(["--train", str(train), "--out", str(work / "from-folder"), *options]) == 0
archive = pack_train_archive(train, work / "ILSVRC2012_img_train.tar")
assert make_shards(["--train", str(archive), "--out", str(work / "from-archive"), *options]) == 0
assert verify_shards([str(work / "from-folder"), "--workers", "2"]) == 0
print("all finished", flush=True)
"""


def test_the_worker_pools_end_in_a_process_with_its_own_sigterm_handler(tmp_path, demo_imagenet):
    """A Pool ends its workers with SIGTERM when its `with` block ends. Forked workers inherit the
    caller's handlers; one that returns left a worker waiting on a lock the Pool held, and the
    verifier's Pool waited for it for ever (the worker's stack: sem_wait in SemLock.acquire). Whether
    a Pool's workers are still alive when it ends is a race; the archive scan's always are."""
    child = subprocess.Popen(
        [sys.executable, "-c", CALLER_WITH_A_SIGTERM_HANDLER, str(demo_imagenet / "train"), str(tmp_path)],
        cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the caller and its stuck workers
        output, _ = child.communicate()
        pytest.fail(f"a worker Pool did not end within 120 s:\n{output}")
    assert child.returncode == 0, output
    assert "all finished" in output and "SIGTERM handler ran" not in output
