"""The trainer as users run it: real processes (torchrun with gloo), real shards, real files.

A two-process run, and what reads its checkpoints: evaluate, predict, export_weights,
average_checkpoints, model.init_from."""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
import torchvision
import webdataset as wds
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train.model
from pipeline.loader import PAD_LABEL, LoaderConfig, create_loader
from pipeline.transforms import torchvision_val_transform
from shards.classes import imagenet_names
from shards.manifest import manifest_digest, read_manifest
from tests.conftest import run_tool, run_with_file_size_limit
from tests.test_loaders import shards_with_a_broken_jpeg
from tests.training import logged_rates_follow_the_schedule, read_val_count, torchrun, train_args
from tools.average_checkpoints import main as average_main
from tools.export_weights import main as export_main
from tools.predict import main as predict_main
from train.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from train.evaluate import main as evaluate_main
from train.evaluate import model_from_checkpoint
from train.model import build_model
from train.trainer import main as train_main


@pytest.fixture(scope="module")
def two_process_run(photo_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    overrides = ("train.epochs=2", "eval.every=1", "optim.ema_decay=0.9", "model.blurpool=true", "eval.flip=true",
                 "data.aug_repeats=2", "data.interpolation=bicubic", "model.drop_path=0.1",
                 "log.grad_norm=true", "log.profile_steps=2", "log.profile_start=1", "log.histograms=true")  # fmt: skip
    result = torchrun(*train_args(photo_shards, run_dir, *overrides, "checkpoint.keep_every_epochs=1"))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


def test_two_process_run_logs_evaluates_and_checkpoints(two_process_run, photo_shards):
    run_dir, result = two_process_run
    assert "training resnet18 on 2 process(es)" in result.stdout
    assert "epoch 1 val: acc1" in result.stdout and " px, each also mirrored)" in result.stdout
    assert "epoch 0 took " in result.stdout and " left for 1 epoch(s) at this pace" in result.stdout
    assert re.search(r"\| data \d+\.\d \(max \d+\.\d on rank [01]\) fwd ", result.stdout), result.stdout
    assert (run_dir / "config.yaml").is_file() and (run_dir / "code_version.txt").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in records) and sum("val/acc1" in r for r in records) == 2
    for record in (r for r in records if "train/loss" in r):
        assert 0 < record["train/grad_norm"] <= record["train/grad_norm_max"] < math.inf
        assert record["train/data_slowest_rank"] in (0, 1)
        assert record["train/data_time_fraction"] <= record["train/data_time_fraction_max"] <= 1.0
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert checkpoint["shards_digest"] == manifest_digest(photo_shards)
    assert not any(key.startswith("module.") for key in checkpoint["model"])
    assert {"optimizer", "scaler", "ema", "global_step", "step_in_epoch", "best_acc1", "config"} <= set(checkpoint)
    assert (run_dir / "best.pt").is_file()
    kept = sorted(p.name for p in run_dir.glob("epoch-*"))
    assert kept == ["epoch-1.pt", "epoch-2.pt"], "checkpoint.keep_every_epochs=1 keeps each epoch's last.pt"
    assert load_checkpoint(run_dir / "epoch-1.pt")["epoch"] == 1, "not replaced when last.pt is"
    assert (run_dir / "epoch-2.pt").read_bytes() == (run_dir / "last.pt").read_bytes()


def profiled_names(trace: Path) -> set[str]:
    return {event.get("name") for event in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}


def test_each_rank_writes_a_trace_of_the_profiled_steps(two_process_run):
    """log.profile_steps=2 from step 1: a Chrome trace per rank with each step and its phases named
    around the operators, and a table of the slowest operators; the log names rank 0's files."""
    run_dir, result = two_process_run
    profile_dir = run_dir / "profile"
    assert sorted(p.name for p in profile_dir.iterdir()) == [
        f"rank{rank}-steps-1-2.{ext}" for rank in (0, 1) for ext in ("json.gz", "txt")
    ]
    for rank in (0, 1):
        names = profiled_names(profile_dir / f"rank{rank}-steps-1-2.json.gz")
        assert {"train step 1", "train step 2", "data", "forward", "backward", "optimizer"} <= names
        assert "train step 0" not in names and "train step 3" not in names
        assert "aten::convolution" in names
        table = (profile_dir / f"rank{rank}-steps-1-2.txt").read_text()
        assert "Self CPU" in table and "forward" in table
    assert f"profiled steps 1-2 on every rank: {profile_dir / 'rank0-steps-1-2.json.gz'}" in result.stdout


def test_a_profile_window_past_the_run_is_refused_and_one_over_its_end_is_cut_short(photo_shards, tmp_path, capsys):
    args = train_args(photo_shards, tmp_path / "run", "train.epochs=1", "eval.every=1", "log.profile_steps=3")[2:]
    assert train_main([*args, "log.profile_start=100000"]) == 2
    message = re.search(r"log\.profile_start: step 100000 is past the run's last step, (\d+)", capsys.readouterr().err)
    last = int(message.group(1))
    assert train_main([*args, f"log.profile_start={last}"]) == 0
    trace = tmp_path / "run" / "profile" / f"rank0-steps-{last}-{last}.json.gz"
    assert f"train step {last}" in profiled_names(trace)
    assert f"profiled steps {last}-{last}: {trace} (chrome" in capsys.readouterr().out, "one process: no other ranks"
    assert sorted(p.name for p in trace.parent.iterdir()) == [trace.name, f"rank0-steps-{last}-{last}.txt"]


def test_the_log_window_gathers_each_ranks_wait_for_data(tmp_path):
    """A rank that waits longer for its data (a slower disk or fewer cores on its node) holds the
    others back at the all-reduce; the log names it. Two gloo ranks, each its own wait and losses.
    The ranks' clocks differ too: a timed checkpoint that one finds due, all save. Gradient norms
    are the window's mean and largest, leaving out a skipped step's infinite one."""
    script = tmp_path / "window.py"
    script.write_text(
        "import json, torch\n"
        "from train.distributed import setup_distributed, teardown_distributed\n"
        "from train.signals import StopRequest\n"
        "from train.progress import LogWindow\n"
        "ctx = setup_distributed()\n"
        "window = LogWindow(4, ctx, start_step=10)\n"
        "norms = [2.0, float('inf'), 4.0]  # the second step's skipped by a float16 GradScaler\n"
        "for step in range(10, 13):\n"
        "    norm = torch.tensor(norms[step - 10])\n"
        "    window.record(step, torch.tensor(float(ctx.rank + 1)), images=8, grad_norm=norm)\n"
        "stats = window.reduce(13, StopRequest(1.0), data_ms=[4.0, 40.0][ctx.rank], checkpoint_due=ctx.rank == 1)\n"
        "window.reset(13)\n"
        "window.record(13, torch.tensor(1.0), images=8)\n"
        "unrecorded = window.reduce(14, StopRequest(1.0))['grad_norm']\n"
        f"path = {str(tmp_path)!r} + f'/rank-{{ctx.rank}}.json'\n"
        "report = {'data': stats['data_ms_by_rank'], 'loss': stats['loss'], 'save': stats['checkpoint_due'],\n"
        "          'grad_norm': stats['grad_norm'], 'unrecorded': unrecorded}\n"
        "open(path, 'w').write(json.dumps(report))\n"
        "teardown_distributed(ctx)\n"
    )
    result = torchrun(str(script), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert report["data"] == [4.0, 40.0] and report["loss"] == 1.5
        assert report["save"], "a checkpoint one rank finds due is saved by all (each takes part)"
        assert report["grad_norm"] == [3.0, 4.0], "mean and max of the finite norms"
        assert report["unrecorded"] is None, "a window without norms (log.grad_norm off) reports none"


def test_two_processes_train_from_raw_pixels_with_torch_uint8(raw_and_jpeg_shards, tmp_path):
    """The torch-uint8 backend under torchrun: persistent DataLoader workers serve epochs of two sizes
    (progressive resizing), evaluation (from the JPEG val split, by DALI) and checkpoints follow, and
    every process exits."""
    raw, _ = raw_and_jpeg_shards
    run_dir = tmp_path / "run"
    args = train_args(raw, run_dir, "data.backend=torch-uint8", "data.val_backend=dali-cpu", "train.epochs=3")
    args += ["eval.every=1", "resolution.max=64", "resolution.end_ramp=2", "resolution.step=32"]
    result = torchrun(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data torch-uint8 (val dali-cpu)" in result.stdout
    assert "epoch 0: train images at 32 px" in result.stdout and "epoch 1: train images at 64 px" in result.stdout
    assert "epoch 2: train images" not in result.stdout, "logged when the size changes"
    assert result.stdout.count("images at 32 px)") == 3, "val stays at resolution.val (32)"
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3


def test_tensorboard_reads_the_event_files(two_process_run):
    run_dir, _ = two_process_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "train/data_time_fraction", "val/acc1", "val/acc5",
            "train/grad_norm", "train/grad_norm_max"} <= tags  # fmt: skip
    assert len(events.Scalars("val/acc1")) == 2
    assert "train/gpu_memory_gib" not in tags, "GPU memory is logged on GPUs only"
    assert len(list((run_dir / "tensorboard").iterdir())) == 1, "only rank 0 writes"
    # log.histograms: each parameter's weights at each evaluation (the last one kept by the reader)
    last = load_checkpoint(run_dir / "last.pt")
    names = [name for name, _ in build_model("resnet18", last["num_classes"], blurpool=True).named_parameters()]
    assert set(events.Tags()["histograms"]) == {f"weights/{name}" for name in names}
    histogram = events.Histograms("weights/fc.weight")[-1]
    assert histogram.step == last["global_step"] and histogram.histogram_value.num == last["num_classes"] * 512


def straightforward_logits(checkpoint: Path, shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Each val image's logits and label, in the shards' order, by one process in one plain loop: as
    it is and mirrored (the run's eval.flip), with BlurPool (model.blurpool), resized bicubically
    (data.interpolation)."""
    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    cfg = LoaderConfig(
        backend="dali-cpu", batch_size=8, val_image_size=32, workers=1, dtype="float32", interpolation="bicubic"
    )
    loader = create_loader(str(shards), "val", cfg)
    all_logits, all_labels = [], []
    with torch.no_grad():
        for images, labels in loader:
            keep = labels != PAD_LABEL
            all_logits.append(((model(images) + model(torch.flip(images, dims=[3]))) / 2)[keep])
            all_labels.append(labels[keep])
    loader.close()
    return torch.cat(all_logits), torch.cat(all_labels)


def straightforward_eval(checkpoint: Path, shards: Path, columns: list[int] | None = None) -> dict:
    """Argmax and a plain sum over `straightforward_logits`: the reference the distributed eval must
    equal. `columns`: label i is the model's output columns[i], predicted among those outputs only."""
    logits, labels = straightforward_logits(checkpoint, shards)
    if columns is not None:
        logits = logits[:, columns]
    top5 = logits.topk(5, dim=1).indices
    correct1 = int((top5[:, 0] == labels).sum())
    correct5 = int((top5 == labels[:, None]).any(dim=1).sum())
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double().tolist()
    count = len(labels)
    per_class = {}  # label: [samples, top-1 correct, top-5 correct, loss sum, {wrong top-1 prediction: times}]
    for label, top, loss in zip(labels.tolist(), top5.tolist(), losses, strict=True):
        row = per_class.setdefault(label, [0, 0, 0, 0.0, {}])
        row[0], row[1], row[2], row[3] = row[0] + 1, row[1] + (top[0] == label), row[2] + (label in top), row[3] + loss
        if top[0] != label:
            row[4][top[0]] = row[4].get(top[0], 0) + 1
    return {"acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count, "loss": sum(losses) / count,
            "samples": count, "per_class": per_class}  # fmt: skip


def check_per_class_file(path: Path, reference: dict, wnids: list[str]) -> None:
    """The --per-class CSV has a line per class of the shards, in label order, with the reference's
    counts (classes without val images have none), its figures follow from them, and it names the
    class each class's images were most often predicted as instead."""
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert [line["wnid"] for line in lines] == wnids
    assert [int(line["class"]) for line in lines] == list(range(len(wnids)))
    names = imagenet_names()
    mistaken = 0
    for label, line in enumerate(lines):
        samples, correct1, correct5, loss_sum, wrong = reference["per_class"].get(label, [0, 0, 0, 0.0, {}])
        counts = (int(line["samples"]), int(line["top1_correct"]), int(line["top5_correct"]))
        assert counts == (samples, correct1, correct5)
        assert line["name"] == (names.get(line["wnid"]) or "")
        if samples:
            assert float(line["acc1"]) == pytest.approx(100 * correct1 / samples, abs=1e-4)
            assert float(line["acc5"]) == pytest.approx(100 * correct5 / samples, abs=1e-4)
            assert float(line["loss"]) == pytest.approx(loss_sum / samples, abs=2e-6)
        else:
            assert line["acc1"] == line["acc5"] == line["loss"] == ""
        if wrong:
            times = max(wrong.values())
            predicted = min(c for c, t in wrong.items() if t == times)  # the lowest class among equals
            assert (line["mistaken_for"], int(line["mistaken_times"])) == (wnids[predicted], times)
            assert line["mistaken_for_name"] == (names.get(wnids[predicted]) or "")
            mistaken += 1
        else:
            assert line["mistaken_for"] == line["mistaken_for_name"] == line["mistaken_times"] == ""
    assert sum(int(line["samples"]) for line in lines) == reference["samples"]
    assert mistaken, "the model makes mistakes: the file names them"


def check_predictions_file(path: Path, checkpoint: Path, shards: Path, wnids: list[str]) -> None:
    """--predictions has one line per val sample, sorted by key (named here by the webdataset
    library), with its label and the top five of a plain loop's softmax."""
    logits, labels = straightforward_logits(checkpoint, shards)
    urls = [str(shards / s.file) for s in read_manifest(shards).splits["val"].shards]
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    probabilities, classes = logits.softmax(dim=1).topk(5, dim=1)
    expected = sorted(zip(keys, labels.tolist(), classes.tolist(), probabilities.tolist(), strict=True))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in records] == [key for key, *_ in expected]
    for record, (key, label, top, probs) in zip(records, expected, strict=True):
        assert (record["label"], record["wnid"], record["top5"]) == (label, wnids[label], top), key
        assert record["top5_wnids"] == [wnids[c] for c in top]
        assert record["top5_probs"] == pytest.approx(probs, abs=2e-6)


def test_evaluation_is_identical_for_1_2_and_3_processes(two_process_run, photo_shards, tmp_path):
    """...and equal to the trainer's own evaluation of the model it saved (every rank scores rank 0's
    BatchNorm statistics, not those its own last batch left); so are the --per-class counts and the
    --predictions file."""
    run_dir, _ = two_process_run
    args = ["-m", "train.evaluate", "--checkpoint", str(run_dir / "last.pt"), "--shards", str(photo_shards),
            "--batch-size", "8", "--workers", "1"]  # fmt: skip
    files = {
        n: ["--per-class", str(tmp_path / f"{n}.csv"), "--predictions", str(tmp_path / f"{n}.jsonl")] for n in (1, 3)
    }
    single = run_tool(*args[1:], *files[1], check=True)
    results = [json.loads(single.stdout.strip().splitlines()[-1])]
    for nproc in (2, 3):
        out = torchrun(*args, *files.get(nproc, []), nproc=nproc)
        assert out.returncode == 0, out.stderr
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference = straightforward_eval(run_dir / "last.pt", photo_shards)
    wnids = [c.wnid for c in read_manifest(photo_shards).classes]
    for name in ("1.csv", "3.csv"):
        check_per_class_file(tmp_path / name, reference, wnids)
    assert results[0]["per_class"] == str(tmp_path / "1.csv") and "per_class" not in results[1]
    check_predictions_file(tmp_path / "1.jsonl", run_dir / "last.pt", photo_shards, wnids)
    assert (tmp_path / "3.jsonl").read_bytes() == (tmp_path / "1.jsonl").read_bytes()
    assert results[0]["predictions"] == str(tmp_path / "1.jsonl")
    for result in results:
        assert result["samples"] == reference["samples"] == read_val_count(photo_shards) and result["flip"]
        assert result["acc1"] == reference["acc1"] and result["acc5"] == reference["acc5"]
        # Per-sample losses are bitwise equal; only the float64 summation order differs by world size.
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-12)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "val/acc1" in r][-1]
    assert (trained["val/acc1"], trained["val/acc5"]) == (reference["acc1"], reference["acc5"])
    assert trained["val/loss"] == pytest.approx(reference["loss"], rel=1e-12)
    ema = json.loads(run_tool(*args[1:], "--ema", check=True).stdout.strip().splitlines()[-1])
    assert (trained["val/ema_acc1"], trained["val/ema_acc5"]) == (ema["acc1"], ema["acc5"])
    assert trained["val/ema_loss"] == pytest.approx(ema["loss"], rel=1e-12)
    unflipped = json.loads(run_tool(*args[1:], "--no-flip", check=True).stdout.strip().splitlines()[-1])
    assert not unflipped["flip"] and unflipped["loss"] != reference["loss"]


def test_a_weights_file_that_is_not_a_state_dict_is_named(tmp_path):
    """--weights and model.init_from: a file torch.load cannot read safely, or one holding something
    else than tensors by name, is an error naming the option and the file."""
    model = build_model("resnet18", 10)
    garbage, listed = tmp_path / "garbage.pth", tmp_path / "list.pth"
    garbage.write_bytes(b"not a pickle")
    text = tmp_path / "hello.txt"
    text.write_text("hello\n")  # a KeyError inside torch.load, not an UnpicklingError
    torch.save([torch.zeros(1)], listed)
    for unreadable in (garbage, text):
        with pytest.raises(CheckpointError, match=f"--weights: {unreadable}: not a weights file torch.load can read"):
            load_weights(model, unreadable, "--weights")
    with pytest.raises(CheckpointError, match=f"--weights: {listed}: neither a state_dict nor a checkpoint"):
        load_weights(model, listed, "--weights")


@pytest.mark.parametrize("ema", [False, True])
def test_predict_scores_an_image_as_the_run_evaluated_it(two_process_run, tmp_path, capsys, ema):
    """The fixture's run has BlurPool, evaluates with flips and resizes bicubically: tools.predict
    rebuilds that model (or with --ema its EMA) and scores each image with its mirror (the mean of
    both logits), after a bicubic resize, as a plain computation here does."""
    last = two_process_run[0] / "last.pt"
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(picture)
    assert predict_main(["--checkpoint", str(last), str(picture)] + (["--ema"] if ema else [])) == 0
    printed = capsys.readouterr().out.splitlines()

    checkpoint = load_checkpoint(last)
    model = model_from_checkpoint(checkpoint, use_ema=ema).eval()
    config = checkpoint["config"]
    size, crop_pct = config["resolution"]["val"], config["data"]["crop_pct"]
    image = torchvision_val_transform(size, crop_pct, "bicubic")(Image.open(picture).convert("RGB"))[None]
    bilinear = torchvision_val_transform(size, crop_pct, "bilinear")(Image.open(picture).convert("RGB"))[None]
    assert not torch.equal(image, bilinear)
    with torch.no_grad():
        top = ((model(image) + model(torch.flip(image, dims=[3]))) / 2).softmax(dim=1)[0].topk(5)
    assert printed[0] == str(picture)
    assert [line.split()[0] for line in printed[1:]] == [f"{p:.1%}" for p in top.values.tolist()]
    wnids = [wnid for wnid, _ in checkpoint["classes"]]
    assert [line.rsplit("(", 1)[1].rstrip(")") for line in printed[1:]] == [wnids[i] for i in top.indices.tolist()]

    assert predict_main(["--checkpoint", str(last), "--json", str(picture)] + (["--ema"] if ema else [])) == 0
    row = json.loads(capsys.readouterr().out)  # one line: the same top five, unrounded
    indices = top.indices.tolist()
    assert row["image"] == str(picture) and row["top5"] == indices
    assert row["top5_probs"] == pytest.approx(top.values.tolist(), rel=1e-5)
    assert row["top5_wnids"] == [wnids[i] for i in indices]
    assert row["top5_names"] == [checkpoint["classes"][i][1] or wnids[i] for i in indices]

    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    assert predict_main(["--checkpoint", str(last), str(not_an_image), str(picture)]) == 1  # the others still predicted
    result = capsys.readouterr()
    assert result.err.startswith(f"{not_an_image}: cannot read image (") and result.out.splitlines()[0] == str(picture)


def test_predict_in_batches_scores_each_image_as_alone(two_process_run, photo_shards, tmp_path, capsys):
    """Images scored in batches read by DataLoader workers get the top five each gets alone, in the
    order given; an unreadable file in a batch is reported in its place and the others are scored.
    A batch size or device that cannot work is a usage error naming the option, before any work."""
    last = str(two_process_run[0] / "last.pt")
    pictures = sorted(str(path) for path in (photo_shards.parent / "src" / "val").rglob("*.JPEG"))[:6]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    images = pictures[:3] + [str(not_an_image)] + pictures[3:]

    def predicted(*options: str) -> tuple[list[dict], str]:
        assert predict_main(["--checkpoint", last, "--json", *options, *images]) == 1
        result = capsys.readouterr()
        return [json.loads(line) for line in result.out.splitlines()], result.err

    alone, alone_err = predicted("--batch-size", "1", "--workers", "0")
    batched, batched_err = predicted("--batch-size", "3", "--workers", "2")  # the bad file is in the second batch
    assert [row["image"] for row in batched] == [row["image"] for row in alone] == pictures
    for in_batch, by_itself in zip(batched, alone, strict=True):
        assert in_batch["top5"] == by_itself["top5"]
        assert in_batch["top5_probs"] == pytest.approx(by_itself["top5_probs"], rel=1e-4)
    assert batched_err == alone_err and batched_err.startswith(f"{not_an_image}: cannot read image (")

    folder = tmp_path / "photos"
    for n, picture in enumerate(pictures[:3]):  # under a folder too; names sort in another order than n
        (folder / f"{n % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, folder / f"{n % 2}" / f"{9 - n}.JPEG")
    (folder / ".thumbnails").mkdir()
    (folder / ".thumbnails" / "0.JPEG").write_text("hidden: not predicted")
    (folder / "1" / "gone.JPEG").symlink_to(tmp_path / "nothing-here.JPEG")  # reported, not skipped
    os.mkfifo(folder / "1" / "pipe.JPEG")  # reported, not waited on
    shutil.copy(pictures[0], os.fsdecode(os.fsencode(folder / "1") + b"/caf\xe9.JPEG"))  # a Latin-1 name
    assert predict_main(["--checkpoint", last, "--json", "--batch-size", "2", str(folder), pictures[3]]) == 1
    result = capsys.readouterr()
    rows = [json.loads(line) for line in result.out.splitlines()]
    copies = [str(folder / "0" / "7.JPEG"), str(folder / "0" / "9.JPEG"), str(folder / "1" / "8.JPEG")]
    escaped = f"{folder / '1'}/caf\\xe9.JPEG"  # as tools.make_shards records such a name
    assert [row["image"] for row in rows] == [*copies, escaped, pictures[3]]
    assert [row["top5"] for row in rows] == [alone[n]["top5"] for n in (2, 0, 1, 0, 3)]
    assert result.err.splitlines()[0].startswith(f"{folder / '1' / 'gone.JPEG'}: cannot read image (")
    assert result.err.splitlines()[1] == f"{folder / '1' / 'pipe.JPEG'}: not a regular file"

    for options, message in [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be 0 or more, got -1"),
        (["--device", "gpu"], "--device 'gpu': not a device name"),
        (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s)"),
        ([str(tmp_path / "empty")], f"{tmp_path / 'empty'}: a folder without files"),
    ]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as stopped:
            predict_main(["--checkpoint", last, *options, pictures[0]])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_predict_with_several_checkpoints_predicts_as_their_ensemble(two_process_run, photo_shards, tmp_path, capsys):
    """Two --checkpoint: an image's top five are the ensemble's as train.evaluate scores it (the log
    of the members' mean softmax, averaged with its mirror's as the run's eval.flip says), worked
    out here from the two models. Members must predict the same classes and agree on the val size
    unless --image-size decides it; --weights replaces one checkpoint's weights only."""
    run_dir = two_process_run[0]
    first, second = str(run_dir / "epoch-1.pt"), str(run_dir / "epoch-2.pt")
    picture = str(next((photo_shards.parent / "src" / "val").rglob("*.JPEG")))

    def predicted(*args: str) -> list[str]:
        assert predict_main(list(args)) == 0
        return capsys.readouterr().out.splitlines()

    printed = predicted("--checkpoint", first, "--checkpoint", second, picture)
    assert printed not in (predicted("--checkpoint", first, picture), predicted("--checkpoint", second, picture))

    checkpoints = [load_checkpoint(path) for path in (first, second)]
    models = [model_from_checkpoint(checkpoint).eval() for checkpoint in checkpoints]
    config = checkpoints[0]["config"]
    assert config["eval"]["flip"] and config["data"]["interpolation"] == "bicubic"
    transform = torchvision_val_transform(config["resolution"]["val"], config["data"]["crop_pct"], "bicubic")
    image = transform(Image.open(picture).convert("RGB"))[None]

    def ensemble(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(batch).softmax(dim=1) for model in models]).mean(dim=0).log()

    with torch.no_grad():
        top = ((ensemble(image) + ensemble(image.flip(3))) / 2).softmax(dim=1)[0].topk(5)
    wnids = [wnid for wnid, _ in checkpoints[0]["classes"]]
    assert printed[0] == picture
    assert [line.split()[0] for line in printed[1:]] == [f"{p:.1%}" for p in top.values.tolist()]
    assert [line.rsplit("(", 1)[1].rstrip(")") for line in printed[1:]] == [wnids[i] for i in top.indices.tolist()]

    other_size, other_classes = tmp_path / "other-size.pt", tmp_path / "other-classes.pt"
    checkpoint = load_checkpoint(second)
    checkpoint["config"]["resolution"]["val"] = 48
    torch.save(checkpoint, other_size)
    checkpoint = load_checkpoint(second)
    checkpoint["classes"] = checkpoint["classes"][1:] + checkpoint["classes"][:1]
    torch.save(checkpoint, other_classes)
    assert predict_main(["--checkpoint", first, "--checkpoint", str(other_size), picture]) == 2
    expected = f"{other_size} was trained with resolution.val 48, {first} with {config['resolution']['val']}"
    expected += ": the ensemble's members are scored on the same images, so give --image-size"
    assert f"predict: error: {expected}" in capsys.readouterr().err
    assert len(predicted("--checkpoint", first, "--checkpoint", str(other_size), "--image-size", "48", picture)) == 6
    assert predict_main(["--checkpoint", first, "--checkpoint", str(other_classes), picture]) == 2
    assert f"predict: checkpoint error: {other_classes}: class 0 is {wnids[1]}; in {first} it is {wnids[0]}" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        predict_main(["--checkpoint", first, "--checkpoint", second, "--weights", str(tmp_path / "w.pth"), picture])
    assert "--weights replaces one checkpoint's weights: not with several --checkpoint" in capsys.readouterr().err


def assert_exported_weights_score_as_the_checkpoint(checkpoint_path: Path, out: Path, ema: bool, capsys) -> str:
    """Exports with --hash-name, builds the model by the printed call, loads the file into it
    strictly, and compares its logits with the checkpoint's model's. Returns the builder call."""
    assert export_main(["--checkpoint", str(checkpoint_path), "--out", str(out), "--hash-name"] + ["--ema"] * ema) == 0
    printed = capsys.readouterr().out
    written = next(out.parent.glob(f"{out.stem}-*{out.suffix}"))
    sha256 = hashlib.sha256(written.read_bytes()).hexdigest()
    assert written.name == f"{out.stem}-{sha256[:8]}{out.suffix}" and not out.exists()
    assert f"wrote {written}: {'EMA weights' if ema else 'weights'} at epoch " in printed and sha256 in printed
    call = re.search(r"load with: (.+)\.load_state_dict\(torch\.load\((.+)\)\)$", printed.strip()).group(1)
    model = eval(call, {"torchvision": torchvision, "train": train})  # the printed call, as a user would run it
    state = torch.load(written, weights_only=True)
    assert all(tensor.is_contiguous() for tensor in state.values())
    model.load_state_dict(state)  # strict: every key, nothing else (no optimizer, no EMA step counter)
    reference = model_from_checkpoint(load_checkpoint(checkpoint_path), use_ema=ema).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), reference(image), rtol=1e-5, atol=1e-5)
    return call


@pytest.mark.parametrize("ema", [False, True])
def test_exported_weights_load_into_the_printed_model_and_score_as_the_checkpoint(
    two_process_run, tmp_path, capsys, ema
):
    """The fixture's model has BlurPool, which torchvision lacks: the call printed builds it here."""
    call = assert_exported_weights_score_as_the_checkpoint(
        two_process_run[0] / "last.pt", tmp_path / "resnet18.pth", ema, capsys
    )
    assert call.startswith("train.model.build_model('resnet18', ") and call.endswith(", blurpool=True)")


@pytest.mark.parametrize("source", ["exported", "checkpoint"])
def test_a_run_starts_from_given_weights_with_a_fresh_schedule(two_process_run, photo_shards, tmp_path, source):
    """model.init_from: the fixture's weights, as tools.export_weights writes them or straight from
    its checkpoint, are where a new run starts (at lr 0 its learned parameters stay theirs), at epoch 0."""
    last = two_process_run[0] / "last.pt"
    weights = tmp_path / "weights.pth" if source == "exported" else last
    if source == "exported":
        assert export_main(["--checkpoint", str(last), "--out", str(weights)]) == 0
    run_dir = tmp_path / "run"
    overrides = ["model.blurpool=true", f"model.init_from={weights}", "optim.lr=0", "train.epochs=1"]
    result = run_tool(*train_args(photo_shards, run_dir, *overrides)[1:])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"initial weights from {weights}" in result.stdout
    started, trained = model_from_checkpoint(load_checkpoint(last)), load_checkpoint(run_dir / "last.pt")
    assert trained["epoch"] == 1  # from epoch 0: the fixture's run stopped at epoch 2
    for name, parameter in started.named_parameters():
        assert torch.equal(trained["model"][name], parameter), name


def test_weights_that_do_not_fit_the_model_are_named_before_the_first_step(two_process_run, photo_shards, tmp_path):
    last = two_process_run[0] / "last.pt"  # ResNet-18 with BlurPool
    result = run_tool(*train_args(photo_shards, tmp_path / "run", f"model.init_from={last}")[1:])
    assert result.returncode == 2
    assert f"train: checkpoint error: model.init_from: {last}: its weights do not fit the model (" in result.stderr
    # BlurPool wraps the 6 strided convolutions of layers 2-4 (the first of each stage and its downsample)
    assert "missing 6 (e.g. layer2.0.conv1.weight, " in result.stderr
    assert "unexpected 6 (e.g. layer2.0.conv1.conv.weight, " in result.stderr
    assert "epoch 0 step" not in result.stdout
    absent = tmp_path / "absent.pth"
    result = run_tool(*train_args(photo_shards, tmp_path / "run2", f"model.init_from={absent}")[1:])
    assert result.returncode == 2 and f"model.init_from: not found: {absent}" in result.stderr


def test_averaged_checkpoints_are_the_mean_of_their_weights(two_process_run, tmp_path, capsys):
    """The fixture keeps epoch-1.pt and epoch-2.pt: their mean, float tensors averaged and BatchNorm's
    batch counters from the later; with --best 1 the one of higher val top-1 (the EMA's with --ema)."""
    run_dir = two_process_run[0]
    epochs = [run_dir / "epoch-1.pt", run_dir / "epoch-2.pt"]
    out = tmp_path / "mean.pth"
    assert average_main([*map(str, epochs), "--out", str(out)]) == 0
    assert f"averaging {epochs[0]} (epoch 1 step 0, top-1 " in capsys.readouterr().out
    first, second = (load_checkpoint(path)["model"] for path in epochs)
    mean = torch.load(out, weights_only=True)
    assert set(mean) == set(second) and not all(torch.equal(first[k], second[k]) for k in first)
    for key, tensor in mean.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (first[key].double() + second[key].double()).div(2).float())
        else:
            assert torch.equal(tensor, second[key]), key
    for ema in (False, True):
        metric = "ema_acc1" if ema else "acc1"
        better = max(epochs, key=lambda path: load_checkpoint(path)["metrics"][metric])
        args = [*map(str, epochs), "--out", str(tmp_path / "best.pth"), "--best", "1"] + ["--ema"] * ema
        assert average_main(args) == 0
        best = torch.load(tmp_path / "best.pth", weights_only=True)
        expected = model_from_checkpoint(load_checkpoint(better), use_ema=ema).state_dict()
        assert best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in best)


def test_evaluate_scores_given_weights_with_the_checkpoints_settings(two_process_run, photo_shards, tmp_path, capsys):
    """train.evaluate --weights: epoch-2's weights, exported, scored with epoch-1.pt's settings, score
    as epoch-2.pt does; tools.predict --weights likewise."""
    run_dir = two_process_run[0]
    weights = tmp_path / "epoch-2.pth"
    assert export_main(["--checkpoint", str(run_dir / "epoch-2.pt"), "--out", str(weights)]) == 0
    common = ["--shards", str(photo_shards), "--batch-size", "8", "--workers", "1"]
    assert evaluate_main(["--checkpoint", str(run_dir / "epoch-2.pt"), *common]) == 0
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluate_main(["--checkpoint", str(run_dir / "epoch-1.pt"), "--weights", str(weights), *common]) == 0
    given = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert given["weights"] == str(weights) and direct["weights"] is None
    assert (given["acc1"], given["acc5"], given["loss"]) == (direct["acc1"], direct["acc5"], direct["loss"])
    picture = next((photo_shards.parent / "src" / "val").rglob("*.JPEG"))
    assert predict_main(["--checkpoint", str(run_dir / "epoch-2.pt"), str(picture)]) == 0
    direct = capsys.readouterr().out
    assert predict_main(["--checkpoint", str(run_dir / "epoch-1.pt"), "--weights", str(weights), str(picture)]) == 0
    assert capsys.readouterr().out == direct
    assert predict_main(["--checkpoint", str(run_dir / "epoch-1.pt"), str(picture)]) == 0
    assert capsys.readouterr().out != direct  # the two epochs' weights score it apart
    for main in (evaluate_main, predict_main):  # the EMA or given weights, not both
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(run_dir / "epoch-1.pt"), "--ema", "--weights", str(weights), str(picture)])
        assert "argument --weights: not allowed with argument --ema" in capsys.readouterr().err


def test_evaluate_scores_several_checkpoints_as_one_ensemble(two_process_run, photo_shards, tmp_path, capsys):
    """Two --checkpoint score as the mean of their softmax probabilities (worked out here from the
    two models on the same val images); one checkpoint given twice scores as it does alone; members
    trained with other val settings need the flag that decides them, and --weights only one member."""
    run_dir = two_process_run[0]
    first, second = str(run_dir / "epoch-1.pt"), str(run_dir / "epoch-2.pt")
    common = ["--shards", str(photo_shards), "--batch-size", "8", "--workers", "1", "--no-flip"]

    def scores(*checkpoints: str, extra: tuple[str, ...] = ()) -> dict:
        assert evaluate_main([arg for c in checkpoints for arg in ("--checkpoint", c)] + common + list(extra)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    alone, twice, both = scores(first), scores(first, first), scores(first, second)
    assert alone["checkpoint"] == first and both["checkpoint"] == [first, second]
    assert (twice["acc1"], twice["acc5"], twice["samples"]) == (alone["acc1"], alone["acc5"], alone["samples"])
    assert twice["loss"] == pytest.approx(alone["loss"], abs=1e-5)

    config = load_checkpoint(first)["config"]
    settings = LoaderConfig(
        backend="dali-cpu", batch_size=8, workers=1, dtype="float32", val_image_size=config["resolution"]["val"],
        crop_pct=config["data"]["crop_pct"], interpolation=config["data"]["interpolation"],
    )  # fmt: skip
    loader = create_loader(str(photo_shards), "val", settings)
    models = [model_from_checkpoint(load_checkpoint(path)).eval() for path in (first, second)]
    hits = top5_hits = 0
    log_likelihood, samples = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            probabilities = torch.stack([model(images).softmax(dim=1) for model in models]).mean(dim=0)
            real = labels != PAD_LABEL
            probabilities, labels = probabilities[real], labels[real]
            hits += (probabilities.argmax(dim=1) == labels).sum().item()
            top5_hits += (probabilities.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
            log_likelihood += probabilities[torch.arange(len(labels)), labels].log().sum().item()
            samples += len(labels)
    loader.close()
    assert both["samples"] == samples
    assert both["acc1"] == pytest.approx(100 * hits / samples)
    assert both["acc5"] == pytest.approx(100 * top5_hits / samples)
    assert both["loss"] == pytest.approx(-log_likelihood / samples, rel=1e-6)
    assert both["loss"] not in (alone["loss"], scores(second)["loss"])

    other = tmp_path / "other-size.pt"
    checkpoint = load_checkpoint(second)
    checkpoint["config"]["resolution"]["val"] = 48
    torch.save(checkpoint, other)
    assert evaluate_main(["--checkpoint", first, "--checkpoint", str(other), *common]) == 2
    expected = f"{other} was trained with resolution.val 48, {first} with {config['resolution']['val']}"
    assert f"{expected}: the ensemble's members are scored on the same images, so give --image-size" in (
        capsys.readouterr().err
    )
    assert scores(first, str(other), extra=("--image-size", "48"))["image_size"] == 48
    with pytest.raises(SystemExit):
        evaluate_main(["--checkpoint", first, "--checkpoint", second, "--weights", str(tmp_path / "w.pth"), *common])
    assert "--weights replaces one checkpoint's weights: not with several --checkpoint" in capsys.readouterr().err


def test_evaluate_can_resize_val_images_otherwise_than_the_run(two_process_run, photo_shards, capsys):
    """--crop-pct (torchvision tunes its weights' val resize after training this way): the
    checkpoint's own value scores as the default does, another one scores other pixels; so does
    --interpolation, another resize filter than the run's."""
    checkpoint = str(two_process_run[0] / "epoch-2.pt")
    common = ["--checkpoint", checkpoint, "--shards", str(photo_shards), "--batch-size", "8", "--workers", "1"]
    results = {}
    trained = load_checkpoint(checkpoint)["config"]["data"]["crop_pct"]
    for crop_pct in (None, trained, 1.0):
        assert evaluate_main(common + ([] if crop_pct is None else ["--crop-pct", str(crop_pct)])) == 0
        results[crop_pct] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results[None]["crop_pct"] == trained and results[1.0]["crop_pct"] == 1.0
    assert results[trained]["loss"] == results[None]["loss"] != results[1.0]["loss"]
    assert results[1.0]["samples"] == results[None]["samples"]
    trained = load_checkpoint(checkpoint)["config"]["data"]["interpolation"]
    assert results[None]["interpolation"] == trained == "bicubic"
    assert evaluate_main([*common, "--interpolation", "bilinear"]) == 0
    bilinear = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert bilinear["interpolation"] == "bilinear" and bilinear["loss"] != results[None]["loss"]
    with pytest.raises(SystemExit):
        evaluate_main([*common, "--crop-pct", "1.5"])
    assert "argument --crop-pct: must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_evaluate_files_that_cannot_be_written_are_named_and_the_scores_still_printed(
    two_process_run, photo_shards, tmp_path, capsys
):
    common = ["--checkpoint", str(two_process_run[0] / "last.pt"), "--shards", str(photo_shards), "--workers", "1"]
    with pytest.raises(SystemExit):  # before anything is evaluated
        evaluate_main([*common, "--per-class", str(tmp_path / "no-such-dir" / "classes.csv")])
    assert f"no directory {tmp_path / 'no-such-dir'} to write it in" in capsys.readouterr().err
    taken = tmp_path / "taken.csv"
    taken.mkdir()  # a folder where the file should go: refused before the evaluation, not after it
    with pytest.raises(SystemExit):
        evaluate_main([*common, "--per-class", str(taken)])
    assert f"--per-class {taken}: is a folder; give a file name" in capsys.readouterr().err
    # Files may not grow past 50 bytes, as on a disk that fills up: the write fails after the evaluation.
    classes = tmp_path / "classes.csv"
    full = run_with_file_size_limit(50, "-m", "train.evaluate", *common, "--per-class", str(classes))
    assert full.returncode == 2, full.stdout + full.stderr
    assert json.loads(full.stdout.strip().splitlines()[-1])["samples"] == read_val_count(photo_shards)
    assert f"evaluate: error: cannot write --per-class {classes}" in full.stderr
    assert list(tmp_path.iterdir()) == [taken], "no temporary file is left behind"
    with pytest.raises(SystemExit):
        evaluate_main([*common, "--predictions", str(tmp_path / "no-such-dir" / "val.jsonl")])
    assert f"--predictions {tmp_path / 'no-such-dir' / 'val.jsonl'}: no directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main([*common, "--per-class", str(tmp_path / "out"), "--predictions", str(tmp_path / "." / "out")])
    assert "--per-class and --predictions name the same file" in capsys.readouterr().err


def test_average_checkpoints_names_what_it_cannot_average(two_process_run, tmp_path, capsys):
    run_dir = two_process_run[0]
    out = ["--out", str(tmp_path / "mean.pth")]
    same_step = [str(run_dir / "epoch-2.pt"), str(run_dir / "last.pt")]
    assert average_main([*same_step, *out]) == 2
    assert f"{same_step[0]} and {same_step[1]} hold the same training step: give one of them" in capsys.readouterr().err
    unscored, other_model = tmp_path / "mid-epoch.pt", tmp_path / "plain.pt"
    checkpoint = load_checkpoint(run_dir / "epoch-1.pt")
    save_checkpoint(unscored, checkpoint | {"metrics": {}})
    config = checkpoint["config"] | {"model": checkpoint["config"]["model"] | {"blurpool": False}}
    save_checkpoint(other_model, checkpoint | {"config": config})
    assert average_main([str(run_dir / "epoch-2.pt"), str(unscored), *out, "--best", "1"]) == 2
    assert f"--best needs each checkpoint's val top-1; saved without one: {unscored}" in capsys.readouterr().err
    assert average_main([str(run_dir / "epoch-2.pt"), str(other_model), *out]) == 2
    classes = len(checkpoint["classes"])
    message = f"{other_model} holds resnet18, {classes} classes; {run_dir / 'epoch-2.pt'} holds resnet18 with BlurPool"
    assert message in capsys.readouterr().err
    relabelled = tmp_path / "relabelled.pt"
    save_checkpoint(relabelled, checkpoint | {"classes": checkpoint["classes"][::-1]})
    assert average_main([str(run_dir / "epoch-2.pt"), str(relabelled), *out]) == 2
    assert f"{relabelled} and {run_dir / 'epoch-2.pt'} label other classes" in capsys.readouterr().err
    assert not (tmp_path / "mean.pth").exists()


def test_export_weights_names_what_it_cannot_do(two_process_run, tmp_path, capsys):
    missing = tmp_path / "no-such-dir" / "weights.pth"
    assert export_main(["--checkpoint", str(two_process_run[0] / "last.pt"), "--out", str(missing)]) == 2
    assert f"export_weights: checkpoint error: cannot write {missing} (No such file or directory)" in (
        capsys.readouterr().err
    )
    assert export_main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "w.pth")]) == 2
    assert f"export_weights: checkpoint error: checkpoint not found: {tmp_path / 'none.pt'}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["torch", "dali-cpu"])
def test_an_undecodable_sample_stops_training_with_one_line_naming_it(two_process_run, photo_shards, tmp_path, backend):
    """Exit status 4 and the shard and sample in one line, also when a DataLoader worker met it
    (PyTorch raises it again with the worker's traceback as its message)."""
    # dali-cpu: a header DALI cannot parse (it crashed the process in batches of 32 or more, as
    # evaluate's 256); PIL decodes past that, so the torch backend gets damaged scan data.
    damage = "header" if backend == "dali-cpu" else "scan"
    shards, tar, bad_key = shards_with_a_broken_jpeg(photo_shards, tmp_path, "train", damage)
    result = run_tool(*train_args(shards, tmp_path / "run", f"data.backend={backend}", "train.epochs=1")[1:])
    assert result.returncode == 4, result.stderr
    assert re.search(rf"^train: data error: \S*{tar}: sample {bad_key}: cannot be decoded", result.stderr, re.M)
    assert "Traceback" not in result.stderr, result.stderr

    shards, tar, bad_key = shards_with_a_broken_jpeg(photo_shards, tmp_path / "val", "val", damage)
    checkpoint = two_process_run[0] / "last.pt"
    result = run_tool(
        "train.evaluate",
        "--checkpoint",
        str(checkpoint),
        "--shards",
        str(shards),
        "--backend",
        backend,
        "--workers",
        "1",
    )
    assert result.returncode == 4, result.stderr
    assert re.search(rf"^evaluate: data error: \S*{tar}: sample {bad_key}: cannot be decoded", result.stderr, re.M)
    assert "Traceback" not in result.stderr, result.stderr


def test_a_run_dir_with_checkpoints_is_not_started_afresh_over_them(two_process_run, photo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run[0], run_dir)
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    result = run_tool(*train_args(photo_shards, run_dir, "train.epochs=4")[1:])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{run_dir / 'last.pt'} holds an earlier run: continue it with --resume auto" in result.stderr
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


def test_a_run_resumed_on_one_process_keeps_its_place_in_the_schedule(two_process_run, photo_shards, tmp_path):
    """The two-process run's last.pt (two epochs done) resumed by one process for a third: an epoch
    now has twice the steps, and the learning rate goes on from epoch 2 of the schedule (until
    2026-12-07 it was read from the global step, which put the run back at epoch 1)."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run[0], run_dir)
    overrides = ["train.epochs=3", "model.blurpool=true"]
    result = run_tool(*train_args(photo_shards, run_dir, *overrides)[1:], "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the checkpoint was written by 2 processes, this run has 1" in result.stdout
    assert logged_rates_follow_the_schedule(result.stdout, overrides, global_batch=8) >= 2


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(two_process_run, photo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run[0], run_dir)
    before = (run_dir / "last.pt").read_bytes()
    result = run_tool(
        *train_args(photo_shards, run_dir, "train.epochs=2", "model.blurpool=true")[1:], "--resume", "auto"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = "nothing left to train: the checkpoint has finished 2 epoch(s), train.epochs is 2 (raise it to train on)"
    assert expected in result.stdout
    assert (run_dir / "last.pt").read_bytes() == before


def test_a_run_resumed_on_another_conversion_of_its_shards_says_so(two_process_run, photo_shards, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for path in photo_shards.iterdir():
        (shards / path.name).symlink_to(path)
    (shards / "manifest.json").unlink()
    # The same manifest with one more byte stands for a re-conversion: its digest differs.
    (shards / "manifest.json").write_text((photo_shards / "manifest.json").read_text() + "\n")
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run[0], run_dir)
    result = run_tool(*train_args(shards, run_dir, "train.epochs=2", "model.blurpool=true")[1:], "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    digests = f"manifest.json sha256 {manifest_digest(shards)}, was {manifest_digest(photo_shards)})"
    assert f"note: data.shards holds another conversion than the checkpoint's run read ({digests}\n" in result.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(two_process_run, photo_shards, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_process_run[0], run_dir)
    before = (run_dir / "last.pt").read_bytes()
    overrides = ("train.epochs=4", "optim.lr=1e30", "model.blurpool=true")
    result = run_tool(*train_args(photo_shards, run_dir, *overrides)[1:], "--resume", "auto")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "loss became non-finite at step" in result.stderr
    assert "the checkpoint was written by 2 processes, this run has 1" in result.stdout
    assert (run_dir / "last.pt").read_bytes() == before


def unusable_checkpoints(good: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may pass as a checkpoint, with what the error must say about each."""
    data = good.read_bytes()
    files = {
        "missing": (folder / "missing.pt", "checkpoint not found"),
        "truncated": (folder / "truncated.pt", "unreadable checkpoint, truncated or corrupt"),
        "empty": (folder / "empty.pt", "unreadable checkpoint, truncated or corrupt"),
        "foreign": (folder / "foreign.pt", "not a checkpoint of this project"),
        "text": (folder / "notes.txt", "not a checkpoint of this project (neither torch.save's zip format nor"),
        "weights": (folder / "weights.pth", "a weights file (a state_dict, as tools.export_weights writes), not a"),
        "other version": (folder / "version.pt", "checkpoint version 99, this code reads 1"),
    }
    files["truncated"][0].write_bytes(data[: len(data) // 2])
    files["empty"][0].write_bytes(b"")
    files["text"][0].write_text("hello\n")  # unpickled, its "h" looks up a memo entry: a KeyError in torch.load
    # timm's checkpoints, for one, pickle an argparse Namespace: weights_only loading refuses it.
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, files["foreign"][0])
    torch.save({**torch.load(good, weights_only=True), "version": 99}, files["other version"][0])
    torch.save(torch.load(good, weights_only=True)["model"], files["weights"][0])
    return files


def test_unusable_checkpoints_are_named_not_loaded(two_process_run, tmp_path):
    for kind, (path, message) in unusable_checkpoints(two_process_run[0] / "last.pt", tmp_path).items():
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        assert str(path) in str(caught.value) and message in str(caught.value), kind


def test_resume_evaluate_and_predict_report_a_bad_checkpoint_in_one_line(two_process_run, photo_shards, tmp_path):
    files = unusable_checkpoints(two_process_run[0] / "last.pt", tmp_path)
    truncated, foreign, text = files["truncated"][0], files["foreign"][0], files["text"][0]
    without_ema = tmp_path / "without-ema.pt"
    save_checkpoint(without_ema, load_checkpoint(two_process_run[0] / "last.pt") | {"ema": {}})
    run_dir = tmp_path / "run"
    runs = {
        "train": run_tool(*train_args(photo_shards, run_dir)[1:], "--resume", str(truncated)),
        "evaluate": run_tool("train.evaluate", "--checkpoint", str(foreign), "--shards", str(photo_shards)),
        "predict": run_tool("tools.predict", "--checkpoint", str(truncated), "README.md"),
        "predict text": run_tool("tools.predict", "--checkpoint", str(text), "README.md"),
        "predict --ema": run_tool("tools.predict", "--checkpoint", str(without_ema), "--ema", "README.md"),
    }
    for tool, result in runs.items():
        assert result.returncode == 2, tool + result.stdout + result.stderr
        assert f"{tool.split()[0]}: checkpoint error: " in result.stderr and "Traceback" not in result.stderr, tool
    assert str(truncated) in runs["train"].stderr and str(foreign) in runs["evaluate"].stderr
    assert "checkpoint has no EMA weights (optim.ema_decay was 0)" in runs["predict --ema"].stderr
    assert not (run_dir / "last.pt").exists()


def test_resuming_another_model_names_both(two_process_run, photo_shards, tmp_path):
    last = two_process_run[0] / "last.pt"
    result = run_tool(*train_args(photo_shards, tmp_path / "run", "model.name=resnet34")[1:], "--resume", str(last))
    assert result.returncode == 2, result.stdout + result.stderr
    expected = "holds resnet18 with BlurPool; this run builds resnet34 without BlurPool (model.name, model.blurpool)"
    assert f"{last}: {expected}" in result.stderr


def val_shards_of(classes: list[Path], out: Path, names: list[str] | None = None, *options: str) -> Path:
    """Val-only shards of these class folders (each keeps its images), under their own or the given names."""
    tree = out.parent / (out.name + "-src")
    tree.mkdir()
    for folder, name in zip(classes, names or [folder.name for folder in classes], strict=True):
        (tree / name).symlink_to(folder, target_is_directory=True)
    run_tool("tools.make_shards", "--val", str(tree), "--out", str(out), "--workers", "2", "--no-progress", *options,
             check=True)  # fmt: skip
    return out


def test_evaluating_on_shards_of_other_classes_names_the_difference(two_process_run, photo_shards, tmp_path, capsys):
    last = two_process_run[0] / "last.pt"
    folders = sorted((photo_shards.parent / "src" / "val").iterdir())
    fewer = val_shards_of(folders[:-1], tmp_path / "fewer")
    renamed = tmp_path / "n99999999"  # same images, a wnid after every real one: the last label changes class
    renamed.symlink_to(folders[-1], target_is_directory=True)
    other = val_shards_of([*folders[:-1], renamed], tmp_path / "other")
    for shards, message in [
        (fewer, f"{last}: a model of {len(folders)} classes; {fewer} has {len(folders) - 1}; all {len(folders) - 1} "
         f"classes of {fewer} are among the model's {len(folders)}: --class-subset predicts among them only"),
        (other, f"{last}: class {len(folders) - 1} is {folders[-1].name}; in {other} it is n99999999"),
    ]:  # fmt: skip
        assert evaluate_main(["--checkpoint", str(last), "--shards", str(shards), "--workers", "1"]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr, stderr
    assert "--class-subset" not in stderr  # n99999999 is not one of the model's classes
    assert evaluate_main(["--checkpoint", str(last), "--shards", str(other), "--workers", "1", "--class-subset"]) == 2
    message = f"{last}: 1 of the {len(folders)} classes of {other} are not among the model's {len(folders)}"
    assert f"{message}, e.g. ['n99999999']" in capsys.readouterr().err


def test_test_sets_of_the_models_classes_are_scored_by_wnid(two_process_run, photo_shards, tmp_path, capsys):
    """ImageNetV2's layout (folders named by class index), converted with --class-index-folders, scores
    as the val split it was made from; shards of some of the classes, as ImageNet-A and ImageNet-R
    are, score with --class-subset as a plain loop that predicts among those classes' outputs (and
    an ensemble of the model and itself as the model)."""
    last = two_process_run[0] / "last.pt"
    model_wnids = [wnid for wnid, _ in load_checkpoint(last)["classes"]]
    folders = sorted((photo_shards.parent / "src" / "val").iterdir())
    common = ["--checkpoint", str(last), "--batch-size", "8", "--workers", "1"]

    def scores(shards: Path, *options: str) -> dict:
        assert evaluate_main([*common, "--shards", str(shards), *options]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    class_file = tmp_path / "classes.txt"
    class_file.write_text("".join(f"{wnid}\n" for wnid in model_wnids))
    numbered = [str(model_wnids.index(folder.name)) for folder in folders]
    v2 = val_shards_of(folders, tmp_path / "v2", numbered, "--class-index-folders", "--classes", str(class_file))
    original, renamed = scores(photo_shards), scores(v2)
    for key in ("acc1", "acc5", "samples", "classes"):
        assert renamed[key] == original[key], key
    assert original["classes"] == len(model_wnids)
    assert renamed["loss"] == pytest.approx(original["loss"], rel=1e-6)  # the same images, read in another order

    chosen = folders[::2]
    part = val_shards_of(chosen, tmp_path / "part")
    subset = scores(part, "--class-subset", "--per-class", str(tmp_path / "part.csv"))
    reference = straightforward_eval(last, part, [model_wnids.index(folder.name) for folder in chosen])
    check_per_class_file(tmp_path / "part.csv", reference, [folder.name for folder in chosen])
    assert subset["classes"] == len(chosen) and subset["samples"] == reference["samples"]
    assert (subset["acc1"], subset["acc5"]) == (reference["acc1"], reference["acc5"])
    assert subset["loss"] == pytest.approx(reference["loss"], rel=1e-12)
    pair = scores(part, "--class-subset", "--checkpoint", str(last))  # an ensemble of the model and itself
    assert (pair["classes"], pair["acc1"], pair["acc5"]) == (subset["classes"], subset["acc1"], subset["acc5"])
    assert pair["loss"] == pytest.approx(subset["loss"], rel=1e-6)


def with_imagenet_head(checkpoint: Path, out: Path) -> Path:
    """The run's model with its head spread over ImageNet-1k's 1000 classes in sorted wnid order: each
    trained class keeps its output, at its ImageNet index; the other outputs score far below them."""
    saved = load_checkpoint(checkpoint)
    names = imagenet_names()
    imagenet = sorted(names)
    at = torch.tensor([imagenet.index(wnid) for wnid, _ in saved["classes"]])
    state = dict(saved["model"])
    state["fc.weight"] = torch.zeros(1000, state["fc.weight"].shape[1]).index_copy(0, at, state["fc.weight"])
    state["fc.bias"] = torch.full((1000,), -100.0).index_copy(0, at, state["fc.bias"])
    classes = [[wnid, names[wnid]] for wnid in imagenet]
    unversioned = {k: v for k, v in saved.items() if k != "version"}
    save_checkpoint(out, unversioned | {"model": state, "ema": {}, "classes": classes, "num_classes": 1000})
    return out


def test_real_labels_score_imagenets_val_images_by_their_file_names(
    two_process_run, photo_shards, demo_imagenet, tmp_path, capsys
):
    """--real-labels with ImageNet-ReaL's real.json (timm's copy; 3,163 of its 50,000 images have no
    label and count for nothing): on val shards of files named as ImageNet's val images, 1 and 3
    processes report the ReaL top-1/top-5 of a plain loop that looks each file name up in the JSON."""
    real_json = Path(timm.data.__file__).parent / "_info" / "imagenet_real_labels.json"
    real_sets = json.loads(real_json.read_text())
    checkpoint = with_imagenet_head(two_process_run[0] / "last.pt", tmp_path / "imagenet-head.pt")
    class_file = tmp_path / "classes.txt"
    class_file.write_text("".join(f"{wnid}\n" for wnid in sorted(imagenet_names())))
    val, labels_file = demo_imagenet / "val", demo_imagenet / "val_labels.txt"
    convert = ["--val-labels", str(labels_file), "--classes", str(class_file), "--workers", "2", "--no-progress"]
    shards = tmp_path / "val-shards"
    run_tool("tools.make_shards", "--val", str(val), *convert, "--out", str(shards), check=True)
    args = ["-m", "train.evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards), "--batch-size", "8",
            "--workers", "1", "--real-labels", str(real_json)]  # fmt: skip
    assert evaluate_main(args[2:]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    three = torchrun(*args, nproc=3)
    assert three.returncode == 0, three.stderr

    logits, _ = straightforward_logits(checkpoint, shards)
    urls = [str(shards / s.file) for s in read_manifest(shards).splits["val"].shards]
    names = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    hits1 = hits5 = labelled = 0
    for name, top5 in zip(names, logits.topk(5, dim=1).indices.tolist(), strict=True):
        real = real_sets[int(name.removeprefix("ILSVRC2012_val_")) - 1]
        if real:
            labelled += 1
            hits1 += top5[0] in real
            hits5 += any(prediction in real for prediction in top5)
    assert 0 < labelled < len(names)  # the demo's names include ReaL images without a label
    for result in (single, json.loads(three.stdout.strip().splitlines()[-1])):
        assert result["real_samples"] == labelled and result["samples"] == len(names)
        assert (result["real_acc1"], result["real_acc5"]) == (100 * hits1 / labelled, 100 * hits5 / labelled)

    other_names = tmp_path / "other-val"
    shutil.copytree(val, other_names)
    first = sorted(other_names.iterdir())[0]
    first.rename(other_names / "holiday-photo.JPEG")
    other_labels = tmp_path / "other-labels.txt"
    other_labels.write_text(labels_file.read_text().replace(first.name, "holiday-photo.JPEG"))
    convert[1] = str(other_labels)
    run_tool("tools.make_shards", "--val", str(other_names), *convert, "--out", str(tmp_path / "other"), check=True)
    not_json = tmp_path / "real.json"
    not_json.write_text(json.dumps(real_sets[:100]))
    for checkpoint_used, shards_used, labels_used, message in [
        (checkpoint, tmp_path / "other", real_json, "sample holiday-photo of"),
        (checkpoint, shards, not_json, f"--real-labels {not_json}: not ReaL's real.json"),
        (two_process_run[0] / "last.pt", photo_shards, real_json, "ReaL labels ImageNet-1k's 1000 classes in sorted"),
    ]:
        options = [
            "--checkpoint",
            str(checkpoint_used),
            "--shards",
            str(shards_used),
            "--real-labels",
            str(labels_used),
        ]
        assert evaluate_main([*options, "--workers", "1"]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr, stderr


def test_trains_from_an_image_folder_without_shards(tmp_path, real_photos, demo_imagenet, capsys):
    from tests.conftest import make_photo_tree

    tree = make_photo_tree(tmp_path / "imagenet", real_photos, demo_imagenet, num_classes=16)
    run_dir = tmp_path / "run"
    run_tool(*train_args(tree, run_dir, "data.backend=folder", "train.epochs=1")[1:], check=True)
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert [wnid for wnid, _ in checkpoint["classes"]] == sorted(p.name for p in (tree / "train").iterdir())
    # train.evaluate reads a folder's class names too: another class in the last folder is named
    common = ["--checkpoint", str(run_dir / "last.pt"), "--backend", "folder", "--workers", "1"]
    assert evaluate_main([*common, "--shards", str(tree)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    classes = len(checkpoint["classes"])  # 16 real photographs' classes, or the demo set's 10
    assert scored["classes"] == classes and scored["samples"] == len(list((tree / "val").rglob("*.JPEG")))
    other = tmp_path / "other"
    shutil.copytree(tree / "val", other / "val", symlinks=True)
    last_class = sorted((other / "val").iterdir())[-1]
    last_class.rename(other / "val" / "n99999999")
    assert evaluate_main([*common, "--shards", str(other)]) == 2
    assert f"class {classes - 1} is {last_class.name}; in {other} it is n99999999" in capsys.readouterr().err


def test_another_torchvision_classifier_trains_with_its_recipes_parts_evaluates_and_predicts(
    photo_shards, tmp_path, capsys
):
    """Nothing downstream assumes a ResNet: the class count comes from the checkpoint's record.
    MixUp and CutMix turn the labels into class probabilities, which the loss takes as they are;
    AutoAugment's ImageNet policy (torchvision's MobileNetV3 recipe) runs in the DALI pipeline,
    random erasing on the batch."""
    run_dir = tmp_path / "run"
    chosen = ["model.name=mobilenet_v3_small", "optim.optimizer=adamw", "optim.lr=0.001", "optim.weight_decay=0.05"]
    mixing = ["optim.mixup_alpha=0.2", "optim.cutmix_alpha=1.0", "data.auto_augment=auto_augment_imagenet",
              "optim.random_erase=0.2"]  # fmt: skip
    run_tool(*train_args(photo_shards, run_dir, *chosen, *mixing, "train.epochs=1")[1:], check=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses)
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["num_classes"] == len(checkpoint["classes"]) == len(read_manifest(photo_shards).classes)
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(checkpoint["optimizer"]["state"].values())))
    other = run_tool(*train_args(photo_shards, run_dir, *chosen[:1], "train.epochs=2")[1:], "--resume", "auto")
    assert other.returncode == 2
    assert f"{run_dir / 'last.pt'}: holds the state of adamw; this run uses sgd (optim.optimizer)" in other.stderr
    args = ["--checkpoint", str(run_dir / "last.pt"), "--shards", str(photo_shards), "--batch-size", "8"]
    assert evaluate_main([*args, "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == read_val_count(photo_shards)
    picture = next((photo_shards.parent / "src" / "val").rglob("*.JPEG"))
    assert predict_main(["--checkpoint", str(run_dir / "last.pt"), str(picture)]) == 0
    assert capsys.readouterr().out.startswith(str(picture))
    classes = len(checkpoint["classes"])  # without BlurPool the weights load into torchvision's own model
    call = assert_exported_weights_score_as_the_checkpoint(
        run_dir / "last.pt", tmp_path / "mobilenet.pth", False, capsys
    )
    assert call == f"torchvision.models.get_model('mobilenet_v3_small', num_classes={classes})"
    assert export_main(["--checkpoint", str(run_dir / "last.pt"), "--out", str(tmp_path / "ema.pth"), "--ema"]) == 2
    assert "export_weights: checkpoint error: checkpoint has no EMA weights" in capsys.readouterr().err
