"""The benchmark scripts run and report what they promise (rates are not asserted: no timed tests)."""

import importlib
import json
import re
import threading
import time

import pytest
import torch

from pipeline.loader import LoaderConfig, create_loader
from tests.conftest import run_tool, run_with_file_size_limit
from tests.test_loaders import shards_with_a_broken_jpeg
from tools.bench_common import measure_rate


@pytest.fixture(scope="module")
def bench_out(photo_shards, tmp_path_factory):
    """One short run of each benchmark, JSON files named as tools/gpu_check.sh names them."""
    out = tmp_path_factory.mktemp("bench-out")
    pipeline = run_tool(
        "tools.bench_pipeline", "--shards", str(photo_shards), "--backends", "dali-gpu,dali-cpu,torch,synthetic",
        "--batch-size", "8", "--image-size", "64", "--seconds", "0.3", "--workers", "2",
        "--json", str(out / "bench_pipeline.json"), "--hw-decoder-load", "0.65,1",
        "--auto-augment", "none,trivial_augment_wide", "--interpolation", "bilinear,bicubic", check=True,
    )  # fmt: skip
    train = run_tool(
        "tools.bench_train", "--shards", str(photo_shards),
        "--backends", "dali-gpu,dali-cpu,dali-reference,dali-predecoded,torch-uint8", "--batch-size", "4",
        "--image-size", "32", "--seconds", "0.3", "--workers", "2", "--json", str(out / "bench_train_rn18.json"),
        "--profile", str(out / "profile"), "--profile-steps", "3", check=True,
    )  # fmt: skip
    run_tool(
        "tools.bench_dali_reference", "--shards", str(photo_shards), "--batch-size", "8", "--image-size", "64",
        "--seconds", "0.3", "--workers", "1,2", "--json", str(out / "bench_dali_reference.json"), check=True,
    )  # fmt: skip
    return out, pipeline.stdout, train.stdout


def test_bench_pipeline_reports_every_backend_and_split(bench_out):
    out, stdout, _ = bench_out
    report = json.loads((out / "bench_pipeline.json").read_text())
    measured = {(r["backend"], r["split"]) for r in report["results"]}
    assert {("dali-cpu", "train"), ("torch", "val"), ("synthetic", "train")} <= measured
    # TrivialAugment beside each loader's plain train rate, not for val (which it leaves alone) or synthetic
    augmented = {(r["name"], r["split"]) for r in report["results"] if r.get("auto_augment") == "trivial_augment_wide"}
    assert augmented == {("dali-cpu +TA", "train"), ("torch +TA", "train")} | {
        ("dali-cpu +TA bicubic", "train"),
        ("torch +TA bicubic", "train"),
    }
    # bicubic resizes beside bilinear ones, for val too
    bicubic = {(r["name"], r["split"]) for r in report["results"] if r.get("interpolation") == "bicubic"}
    assert {("dali-cpu bicubic", "val"), ("torch bicubic", "train"), ("torch bicubic", "val")} <= bicubic
    assert all(r["images_per_s"] > 0 and r["vs_torch"] > 0 for r in report["results"])
    assert all(r["within_epoch_images_per_s"] > 0 and r["images_per_epoch"] % 8 == 0 for r in report["results"])
    assert report["environment"]["dali"] and report["environment"]["torch"]
    assert "vs torch" in stdout
    if not report["environment"]["gpu"]:
        for load in ("0.65", "1"):
            assert re.search(rf"dali-gpu hw={load} +train skipped: no GPU", stdout)


def test_bench_dali_reference_measures_each_thread_count(bench_out):
    out, _, _ = bench_out
    report = json.loads((out / "bench_dali_reference.json").read_text())
    assert [r["threads"] for r in report["results"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in report["results"])
    on_gpu = report["args"]["device"] == "gpu"
    assert all((r["hw_decoder_load"] is not None) == on_gpu for r in report["results"])


def test_bench_train_reports_the_data_stall(bench_out):
    out, _, stdout = bench_out
    report = json.loads((out / "bench_train_rn18.json").read_text())
    gpu = report["environment"]["gpu"]
    # synthetic first: the model is compiled during its warm-up, not during a backend's measurement
    expected = (
        ["synthetic"] + ["dali-gpu"] * bool(gpu) + ["dali-cpu", "dali-reference", "dali-predecoded", "torch-uint8"]
    )
    assert [r["backend"] for r in report["results"]] == expected
    assert report["results"][0]["vs_synthetic"] == 1.0
    assert all(0.0 <= r["data_wait_fraction"] < 1.0 for r in report["results"])
    assert "data stall" in stdout


def test_reference_loader_reads_every_sample_with_its_label(photo_shards):
    """The plain DALI pipeline fed to bench_train: one batch of the whole train split holds the same
    labels as the project's loader reads in an epoch, as channels_last NCHW images."""
    from pipeline.shard_set import open_shard_set
    from tools.bench_dali_reference import ReferenceLoader

    shard_set = open_shard_set(photo_shards, "train")
    count = shard_set.num_samples
    reference = ReferenceLoader(shard_set, count, 16, 2, 0.0, torch.device("cpu"), torch.float32)
    [(images, labels)] = list(reference)
    reference.close()
    cfg = LoaderConfig(backend="dali-cpu", batch_size=count, image_size=16, workers=2, dtype="float32")
    loader = create_loader(photo_shards, "train", cfg, device=torch.device("cpu"))
    [(_, expected)] = list(loader)
    loader.close()  # its reader thread stops (a later test checks that none is left running)
    assert labels.dtype == torch.int64
    assert sorted(labels.tolist()) == sorted(expected.tolist())
    assert images.shape == (count, 3, 16, 16) and images.is_contiguous(memory_format=torch.channels_last)


def test_predecoded_loader_feeds_the_first_images_of_the_split_with_their_labels(photo_shards):
    """bench_train's no-decoding feed: normalized channels_last crops drawn from the split's first
    images (in manifest order), labelled from their labels, and the same batch again from the same seed."""
    import tarfile

    from pipeline.shard_set import open_shard_set
    from tools.predecoded_loader import PredecodedLoader

    shard_set = open_shard_set(photo_shards, "train")
    with tarfile.open(shard_set.tar_path(0)) as tar:
        labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    first = labels[:3]
    batches = []
    for _ in range(2):
        loader = PredecodedLoader(shard_set, 8, 16, 2, torch.device("cpu"), torch.float32, images=len(first))
        batches.append(next(iter(loader)))
        loader.close()
    (images, batch_labels), (again, again_labels) = batches
    assert images.shape == (8, 3, 16, 16) and images.is_contiguous(memory_format=torch.channels_last)
    assert batch_labels.dtype == torch.int64 and set(batch_labels.tolist()) <= set(first)
    lowest, highest = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # the normalized range of RGB 0..255
    assert lowest - 0.01 <= images.min() < images.max() <= highest + 0.01
    assert torch.equal(images, again) and torch.equal(batch_labels, again_labels)


def test_bench_train_measures_the_dali_backends_with_each_thread_count(photo_shards, tmp_path):
    """--workers 1,2: each DALI backend once per thread count, named by it; synthetic once. (With
    --blurpool and --drop-path, parts of the recipes' models, named so in the report.)"""
    run_tool(
        "tools.bench_train", "--shards", str(photo_shards), "--backends", "dali-cpu", "--batch-size", "4",
        "--image-size", "32", "--seconds", "0.2", "--workers", "1,2", "--blurpool", "--drop-path", "0.05",
        "--json", str(tmp_path / "bench_train_sweep.json"), check=True,
    )  # fmt: skip
    report = run_tool("tools.gpu_report", str(tmp_path)).stdout
    assert "| resnet18, BlurPool, drop path 0.05, batch 4, 32 px | synthetic |" in report
    results = json.loads((tmp_path / "bench_train_sweep.json").read_text())["results"]
    assert [(r["name"], r["workers"]) for r in results] == [
        ("synthetic", 1),
        ("dali-cpu 1 threads", 1),
        ("dali-cpu 2 threads", 2),
    ]
    assert all(r["images_per_s"] > 0 for r in results)


def test_bench_train_reports_a_failed_setting_and_measures_the_rest(photo_shards, tmp_path):
    """A sweep whose second setting cannot be built (no DALI threads).
    The report also names the CUDA work-queue setting the run had in its environment."""
    result = run_tool(
        "tools.bench_train", "--shards", str(photo_shards), "--backends", "dali-cpu", "--batch-size", "2",
        "--image-size", "32", "--seconds", "0.2", "--workers", "1,0,2",
        "--json", str(tmp_path / "bench_train_sweep.json"), env={"CUDA_DEVICE_MAX_CONNECTIONS": "32"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "FAILED dali-cpu 0 threads: ValueError: data.workers must be at least 1, got 0" in result.stdout
    report = json.loads((tmp_path / "bench_train_sweep.json").read_text())
    assert [r["name"] for r in report["results"]] == ["synthetic", "dali-cpu 1 threads", "dali-cpu 2 threads"]
    assert [f["name"] for f in report["failed"]] == ["dali-cpu 0 threads"]
    tabled = run_tool("tools.gpu_report", str(tmp_path), check=True).stdout
    assert "| dali-cpu 0 threads | FAILED: ValueError: data.workers must be at least 1" in tabled
    assert "| resnet18, batch 2, 32 px, CUDA_DEVICE_MAX_CONNECTIONS=32 | synthetic |" in tabled


def test_bench_train_plans_each_loader_setting_and_sm_partition_against_whole_gpu_synthetic():
    import argparse

    from tools.bench_train import measurement_plan

    plain = {"auto_augment": ["none"], "interpolation": ["bilinear"]}
    args = argparse.Namespace(workers=[16, 32], model_sms=[128], hw_decoder_load=[1.0], **plain)
    plan = measurement_plan(["dali-gpu", "synthetic"], args)
    assert [(backend, settings["workers"], sms, name) for backend, settings, sms, name in plan] == [
        ("dali-gpu", 16, None, "dali-gpu hw=1 16 threads"),
        ("dali-gpu", 32, None, "dali-gpu hw=1 32 threads"),
        ("synthetic", 16, None, "synthetic"),
        ("dali-gpu", 16, 128, "dali-gpu hw=1 16 threads, step on 128 SMs"),
        ("dali-gpu", 32, 128, "dali-gpu hw=1 32 threads, step on 128 SMs"),
        ("synthetic", 16, 128, "synthetic, step on 128 SMs"),
    ]
    assert plan[0][1] == {"workers": 16, "hw_decoder_load": 1.0}
    args = argparse.Namespace(
        workers=[16],
        model_sms=None,
        hw_decoder_load=[1.0],
        auto_augment=["none", "trivial_augment_wide"],
        interpolation=["bilinear", "bicubic"],
    )
    plan = measurement_plan(["dali-gpu", "synthetic", "dali-predecoded"], args)
    assert [(name, settings.get("auto_augment"), settings.get("interpolation")) for _, settings, _, name in plan] == [
        ("dali-gpu hw=1", None, None),
        ("dali-gpu hw=1 +TA", "trivial_augment_wide", None),
        ("dali-gpu hw=1 bicubic", None, "bicubic"),
        ("dali-gpu hw=1 +TA bicubic", "trivial_augment_wide", "bicubic"),
        ("synthetic", None, None),
        ("dali-predecoded", None, None),
    ]
    args = argparse.Namespace(workers=[16], model_sms=None, hw_decoder_load=[0.65, 1.0], **plain)
    names = [name for _, _, _, name in measurement_plan(["dali-gpu", "torch", "synthetic"], args)]
    assert names == ["dali-gpu hw=0.65", "dali-gpu hw=1", "torch", "synthetic"]


@pytest.mark.parametrize("tool", ["tools.bench_pipeline", "tools.bench_train"])
def test_benchmarks_refuse_a_folder_without_a_manifest_before_any_work(tool, tmp_path):
    result = run_tool(tool, "--shards", str(tmp_path))
    assert result.returncode == 2
    assert f"argument --shards: {tmp_path}: no manifest.json" in result.stderr


@pytest.mark.parametrize("tool", ["tools.bench_pipeline", "tools.bench_train"])
def test_benchmarks_refuse_sizes_and_times_that_cannot_be_measured_before_any_work(tool, photo_shards, capsys):
    """--seconds nan measured for ever; 0 or less, or a batch of 0, measured nothing and reported
    each backend as failed. (The tools' own entry points, in this process: ten interpreters
    importing torch would add most of a minute to the suite.)"""
    main = importlib.import_module(tool).main
    for option, value, message in [
        ("--seconds", "nan", "must be a number of seconds above 0, got nan"),
        ("--seconds", "0", "must be a number of seconds above 0, got 0"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--image-size", "-8", "must be at least 1, got -8"),
        ("--hw-decoder-load", "0.5,nan", "must be finite numbers, got 0.5,nan"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            main(["--shards", str(photo_shards), option, value])
        out, err = capsys.readouterr()
        assert stopped.value.code == 2 and f"argument {option}: {message}" in err, err
        assert "device:" not in out  # nothing was measured


@pytest.mark.parametrize("tool", ["tools.bench_pipeline", "tools.bench_train"])
def test_benchmarks_refuse_a_json_file_they_could_not_write_before_any_work(tool, photo_shards, tmp_path):
    """A typo in --json's folder would otherwise end a measurement of minutes in a traceback (every
    benchmark takes --json from `bench_common.add_json_flag`)."""
    for json_file, message in [
        (
            tmp_path / "missing" / "rates.json",
            f"{tmp_path / 'missing' / 'rates.json'}: there is no folder {tmp_path / 'missing'}",
        ),
        (tmp_path, f"{tmp_path} is a folder: give a file name"),
    ]:
        result = run_tool(tool, "--shards", str(photo_shards), "--json", str(json_file))
        assert result.returncode == 2 and f"argument --json: {message}" in result.stderr, result.stderr
        assert "device:" not in result.stdout  # nothing was measured


def test_a_json_file_that_cannot_be_written_after_the_measurement_is_named(photo_shards, tmp_path):
    """Files may not grow past 300 bytes (RLIMIT_FSIZE, as a full disk): the rates are printed, then
    one line names --json's file (exit 1), and no temporary file is left."""
    json_file = tmp_path / "rates.json"

    args = ["--shards", str(photo_shards), "--backends", "synthetic", "--splits", "train", "--seconds", "0.2"]
    result = run_with_file_size_limit(300, "-m", "tools.bench_pipeline", *args, "--json", str(json_file))
    assert result.returncode == 1 and "synthetic        train" in result.stdout
    assert f"pipeline: cannot write --json {json_file} (File too large)" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_bench_train_refuses_model_sms_without_a_gpu(photo_shards):
    result = run_tool("tools.bench_train", "--shards", str(photo_shards), "--model-sms", "128")
    assert result.returncode == 2
    assert "--model-sms: needs a CUDA GPU" in result.stderr


def test_bench_train_profiles_each_backend(bench_out):
    """A table of the busiest operators and a loadable trace, with the loop's wait and step named."""
    import gzip

    out, _, _ = bench_out
    stems = {"resnet18-dali-cpu", "resnet18-dali-reference", "resnet18-dali-predecoded", "resnet18-synthetic"}
    stems.add("resnet18-torch-uint8")  # closed after its rate, it starts new workers for the profile
    if torch.cuda.is_available():  # on a GPU the reference decodes with the hardware decoder, at its load
        stems = (stems - {"resnet18-dali-reference"}) | {"resnet18-dali-reference-hw=1", "resnet18-dali-gpu-hw=1"}
    assert {path.name.removesuffix(".txt") for path in (out / "profile").glob("*.txt")} == stems
    for stem in stems:
        table = (out / "profile" / f"{stem}.txt").read_text()
        assert "wait for batch" in table and "step" in table
        step_ms = re.search(r"^step: ([0-9.]+) ms of host time over 3 steps$", table, re.MULTILINE)
        assert step_ms and float(step_ms.group(1)) > 0
        trace = json.loads(gzip.decompress((out / "profile" / f"{stem}.json.gz").read_bytes()))
        assert {"wait for batch", "step"} <= {event.get("name") for event in trace["traceEvents"]}


def test_bench_reader_measures_shards_and_a_folder_with_the_main_thread_idle_and_busy(photo_shards, tmp_path):
    folder = photo_shards.parent / "src" / "train"  # the tree the shards were made from
    result = run_tool(
        "tools.bench_reader", "--shards", str(photo_shards), "--folder", str(folder), "--batch-size", "8",
        "--seconds", "0.3", "--json", str(tmp_path / "bench_reader.json"), check=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "bench_reader.json").read_text())
    assert [r["source"] for r in report["results"]] == ["shards (mapped)", "folder (preadv)"]
    for r in report["results"]:
        assert r["batches_per_s_main_idle"] > 0 and r["batches_per_s_main_busy"] >= 0
        assert re.search(rf"{re.escape(r['source'])} +[0-9.]+ +[0-9.]+ +[0-9.]+", result.stdout)
    tabled = run_tool("tools.gpu_report", str(tmp_path), check=True).stdout
    assert "### Reader thread alone" in tabled
    assert f"| shards (mapped) | {report['results'][0]['batches_per_s_main_idle']:,.1f} |" in tabled


def test_bench_cold_read_times_torch_uint8_workers_from_an_emptied_then_full_page_cache(raw_and_jpeg_shards, tmp_path):
    raw, _ = raw_and_jpeg_shards
    result = run_tool(
        "tools.bench_cold_read", "--shards", str(raw), "--workers", "2", "--batch-size", "4", "--image-size", "32",
        "--steps", "3", "--passes", "2", "--json", str(tmp_path / "bench_cold_read.json"), check=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "bench_cold_read.json").read_text())
    assert report["benchmark"] == "cold_read" and report["stored_image_ext"] == {"train": "ppm"}
    assert [r["epoch"] for r in report["results"]] == [0, 1]
    for r in report["results"]:
        assert r["images"] == 3 * 4 and r["cold_images_per_s"] > 0 and r["warm_images_per_s"] > 0
        assert r["mean_sample_kb"] > 32 * 32 * 3 / 1e3  # the stored photographs are larger than the crops
        assert re.search(
            rf"^ +{r['epoch']} +{r['cold_images_per_s']:.0f} +{r['warm_images_per_s']:.0f} ", result.stdout, re.M
        )
    samples = json.loads((raw / "manifest.json").read_text())["splits"]["train"]["samples"]
    assert f"3 of {samples // 4} steps per pass" in result.stdout
    tabled = run_tool("tools.gpu_report", str(tmp_path), check=True).stdout
    assert "### torch-uint8's workers from a cold page cache" in tabled
    assert f"| 0 | 12 | {report['results'][0]['cold_images_per_s']:,.0f} |" in tabled


def test_bench_cold_read_refuses_a_batch_larger_than_the_split_and_shards_without_train(raw_and_jpeg_shards, tmp_path):
    raw, _ = raw_and_jpeg_shards
    samples = json.loads((raw / "manifest.json").read_text())["splits"]["train"]["samples"]
    result = run_tool("tools.bench_cold_read", "--shards", str(raw), "--batch-size", str(samples + 1))
    assert result.returncode == 2
    assert f"--batch-size {samples + 1}: the train split has only {samples} samples" in result.stderr
    val_only = tmp_path / "val-only"
    val_only.mkdir()
    for name in ("val-000000.tar", "val-000000.idx"):
        (val_only / name).symlink_to(raw / name)
    manifest = json.loads((raw / "manifest.json").read_text())
    del manifest["splits"]["train"]
    (val_only / "manifest.json").write_text(json.dumps(manifest))
    result = run_tool("tools.bench_cold_read", "--shards", str(val_only))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{val_only / 'manifest.json'}: no 'train' split" in result.stderr


def test_bench_cold_read_names_an_undecodable_sample(photo_shards, tmp_path):
    shards, tar, bad_key = shards_with_a_broken_jpeg(photo_shards, tmp_path, "train")
    result = run_tool("tools.bench_cold_read", "--shards", str(shards), "--workers", "2", "--batch-size", "4")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(rf"bench_cold_read: data error: .*{tar}: sample {bad_key}: cannot be decoded", result.stderr)


def test_gpu_report_tables_every_figure_and_each_target(bench_out, tmp_path):
    out, _, _ = bench_out
    result = run_tool("tools.gpu_report", str(out), "--write", str(tmp_path / "report.md"), check=True)
    assert (tmp_path / "report.md").read_text() == result.stdout
    pipeline = json.loads((out / "bench_pipeline.json").read_text())
    for r in pipeline["results"]:
        assert f"| {r['name']} | {r['split']} | {r['images_per_s']:,.0f} |" in result.stdout
        assert f"| {r['loader_cpu_ms_per_batch']:.2f} |" in result.stdout
    assert "- dali-gpu train >= 16,500 images/s: " in result.stdout
    assert "- resnet18, batch 4, 32 px fed by dali-gpu >= 95% of synthetic: " in result.stdout
    uint8 = next(
        r for r in json.loads((out / "bench_train_rn18.json").read_text())["results"] if r["name"] == "torch-uint8"
    )
    verdict = "met" if uint8["vs_synthetic"] >= 0.95 else "NOT met"
    best = f"best {uint8['vs_synthetic']:.3f}, torch-uint8"
    assert f"- resnet18, batch 4, 32 px fed by torch-uint8 >= 95% of synthetic: {verdict} ({best})" in result.stdout
    reference = json.loads((out / "bench_dali_reference.json").read_text())
    for r in reference["results"]:
        assert (
            f"| {r['threads']} | - | {r['images_per_s']:,.0f} |" in result.stdout
            or reference["args"]["device"] == "gpu"
        )
    assert "- best dali-gpu train >= 95% of the best raw rate: " in result.stdout
    if not pipeline["environment"]["gpu"]:
        assert "dali-gpu train >= 16,500 images/s: not measured" in result.stdout


def test_gpu_report_tables_each_pipeline_run(bench_out, tmp_path):
    """gpu_check.sh also measures dali-gpu alone with more threads: a second pipeline file, a second table."""
    import shutil

    out, _, _ = bench_out
    shutil.copy(out / "bench_pipeline.json", tmp_path / "bench_pipeline.json")
    more_threads = json.loads((out / "bench_pipeline.json").read_text())
    more_threads["args"]["workers"] = 4
    (tmp_path / "bench_pipeline_2x_threads.json").write_text(json.dumps(more_threads))
    result = run_tool("tools.gpu_report", str(tmp_path), check=True)
    assert "batch 8, 2 workers/threads" in result.stdout and "batch 8, 4 workers/threads" in result.stdout
    assert result.stdout.count("- dali-gpu train >= 16,500 images/s: ") == 2


def test_reports_name_shards_of_smaller_stored_images(tmp_path, demo_imagenet, bench_out):
    """Rates of shards whose train images were stored small (--train-max-short-side) are labelled so
    per split, and not judged against the full-size targets; full-size shards' files say so too."""
    shards = tmp_path / "small-shards"
    run_tool(
        "tools.make_shards", "--train", str(demo_imagenet / "train"), "--val", str(demo_imagenet / "train"),
        "--out", str(shards), "--train-max-short-side", "64", "--workers", "2", "--no-progress", check=True,
    )  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    run_tool(
        "tools.bench_pipeline", "--shards", str(shards), "--backends", "dali-cpu", "--splits", "train,val",
        "--batch-size", "8", "--image-size", "32", "--seconds", "0.3", "--workers", "2",
        "--json", str(out / "bench_pipeline_small.json"), check=True,
    )  # fmt: skip
    small = json.loads((out / "bench_pipeline_small.json").read_text())
    assert small["stored_short_side_max"] == {"train": 64, "val": None}
    full, _, _ = bench_out
    assert not any(json.loads((full / "bench_pipeline.json").read_text())["stored_short_side_max"].values())
    report = run_tool("tools.gpu_report", str(out), check=True).stdout
    assert "2 workers/threads, 0.3 s per rate, train images stored at short side <= 64)" in report
    assert "- the pipeline targets are for full-size JPEGs: not judged on these shards" in report
    assert "16,500" not in report


def test_benchmarks_name_raw_pixel_shards(raw_and_jpeg_shards, tmp_path):
    """Rates from pixels stored by --train-raw-pixels decode no JPEG: the JSON and the report say so."""
    raw, _ = raw_and_jpeg_shards
    run = run_tool(
        "tools.bench_pipeline", "--shards", str(raw), "--backends", "dali-cpu", "--splits", "train",
        "--batch-size", "8", "--image-size", "32", "--seconds", "0.3", "--workers", "2",
        "--json", str(tmp_path / "bench_pipeline_raw.json"), check=True,
    )  # fmt: skip
    assert "train images stored as raw pixels" in run.stdout
    assert json.loads((tmp_path / "bench_pipeline_raw.json").read_text())["stored_image_ext"] == {"train": "ppm"}
    report = run_tool("tools.gpu_report", str(tmp_path), check=True).stdout
    assert "train images stored as raw pixels)" in report
    assert "- the pipeline targets are for full-size JPEGs: not judged on these shards" in report


def test_gpu_report_names_the_compile_mode(bench_out, tmp_path):
    out, _, _ = bench_out
    train = json.loads((out / "bench_train_rn18.json").read_text())
    for mode, label in (
        (None, "resnet18, batch 4, 32 px"),
        (True, "resnet18 compiled, batch 4, 32 px"),
        ("reduce-overhead", "resnet18 compiled (reduce-overhead), batch 4, 32 px"),
    ):
        train["args"]["compile"] = mode
        (tmp_path / "bench_train_rn18.json").write_text(json.dumps(train))
        assert f"| {label} | synthetic |" in run_tool("tools.gpu_report", str(tmp_path), check=True).stdout


def test_gpu_report_names_a_folder_without_results(tmp_path):
    result = run_tool("tools.gpu_report", str(tmp_path))
    assert result.returncode == 1
    assert (
        f"{tmp_path}: no bench_pipeline*.json, bench_dali_reference.json, bench_reader.json, bench_cold_read.json"
        " or bench_train_*.json" in result.stderr
    )


class SlowSwitchLoader:
    """The synthetic loader with a pause before each epoch's first batch (a stand-in for a slow switch),
    optionally spinning the CPU for `spin_ms` before every batch (a loader busy in the caller's thread).
    """

    def __init__(self, pause_s: float, spin_ms: float = 0.0, helper_thread: bool = False):
        cfg = LoaderConfig(backend="synthetic", batch_size=4, image_size=8, synthetic_steps=5, dtype="float32")
        self.inner = create_loader(None, "train", cfg)
        self.pause_s, self.spin_ms = pause_s, spin_ms
        self.stop = threading.Event()
        if helper_thread:  # a thread of the loader's own kept busy, as DALI's decoder threads are
            threading.Thread(target=self._spin, daemon=True).start()
        self.steps_per_epoch, self.batch_size = self.inner.steps_per_epoch, self.inner.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        time.sleep(self.pause_s)
        for batch in self.inner:
            spin_until = time.thread_time() + self.spin_ms / 1e3
            while time.thread_time() < spin_until:
                pass
            yield batch

    def _spin(self) -> None:
        while not self.stop.is_set():
            sum(range(1000))

    def close(self) -> None:
        self.stop.set()
        self.inner.close()


def test_measure_rate_reports_epoch_switches_apart_from_the_rate_within_epochs():
    pause = 0.2
    rate = measure_rate(SlowSwitchLoader(pause), torch.device("cpu"), seconds=1.5, warmup_batches=2)
    assert rate.images_per_epoch == 20
    assert rate.epoch_switches >= 3
    # Steps take microseconds here, so the switches hold nearly all the time: each costs the pause.
    assert pause * 0.8 < rate.seconds_per_switch < pause * 2
    assert rate.within_epoch_images_per_s > 10 * rate.images_per_s


def test_measure_rate_counts_the_cpu_the_loader_takes_from_the_calling_thread():
    """Sleeping (a thread waiting for a pipeline) costs the caller no CPU; work done in its thread does."""
    idle = measure_rate(SlowSwitchLoader(0.05), torch.device("cpu"), seconds=0.5, warmup_batches=2)
    busy = measure_rate(SlowSwitchLoader(0.05, spin_ms=5), torch.device("cpu"), seconds=0.5, warmup_batches=2)
    assert idle.loader_cpu_ms_per_batch < 2
    assert 5 <= busy.loader_cpu_ms_per_batch < 5 + 2


def test_measure_rate_counts_the_cores_the_whole_process_keeps_busy():
    """The calling thread mostly sleeps; a busy helper thread (as DALI's threads are) shows as a core,
    or as much of one as it gets while another test file runs beside this one (pytest -n 2)."""
    idle = measure_rate(SlowSwitchLoader(0.05), torch.device("cpu"), seconds=0.5, warmup_batches=2)
    helped = measure_rate(
        SlowSwitchLoader(0.05, helper_thread=True), torch.device("cpu"), seconds=0.5, warmup_batches=2
    )
    assert idle.process_cpu_cores < 0.3
    assert helped.process_cpu_cores > idle.process_cpu_cores + 0.3


def test_bench_pipeline_reports_an_undecodable_sample_and_measures_the_rest(photo_shards, tmp_path):
    """A val split with one cut JPEG: each backend's val rate fails naming the sample, in one line
    (no DataLoader worker traceback); the run goes on to the next and exits 1."""
    shards, tar, bad_key = shards_with_a_broken_jpeg(photo_shards, tmp_path, "val", damage="scan")
    result = run_tool(
        "tools.bench_pipeline", "--shards", str(shards), "--backends", "dali-cpu,torch", "--splits", "val",
        "--batch-size", "8", "--image-size", "32", "--seconds", "60", "--workers", "1",
        "--json", str(tmp_path / "bench_pipeline.json"),
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    report = json.loads((tmp_path / "bench_pipeline.json").read_text())
    assert [(f["name"], f["split"]) for f in report["failed"]] == [("dali-cpu", "val"), ("torch", "val")]
    for failure in report["failed"]:
        assert re.fullmatch(
            rf"SampleDecodeError: [^\n]*{tar}: sample {bad_key}: cannot be decoded[^\n]*", failure["error"]
        )
        assert f"FAILED {failure['name']} val: {failure['error']}" in result.stdout
    tabled = run_tool("tools.gpu_report", str(tmp_path), check=True).stdout
    assert f"| dali-cpu | val | FAILED: {report['failed'][0]['error']} |" in tabled


def test_bench_convert_compares_the_converter_from_folders_and_from_the_archive_with_a_bare_decode(demo_imagenet):
    result = run_tool(
        "tools.bench_convert", "--src", str(demo_imagenet / "train"), "--workers", "2", "--repeat", "1",
        "--shard-size-mb", "0.05", "--archive", check=True,
    )  # fmt: skip
    rows = dict(re.findall(r"^(\S.*?) +([\d.]+) images/s", result.stdout, re.MULTILINE))
    assert set(rows) == {"bare parallel decode", "make_shards", "make_shards from archive"}, result.stdout
    assert all(float(rate) > 0 for rate in rows.values())
    assert re.search(r"make_shards from archive +[\d.]+ images/s +[\d.]+ of bare decode", result.stdout)


def test_gpu_report_judges_the_targets_on_the_plain_transform_only(bench_out, tmp_path):
    """Rows measured with TrivialAugment are tabled beside the others but not judged against the
    targets, which are for the plain train transform."""
    out, _, _ = bench_out
    report = json.loads((out / "bench_train_rn18.json").read_text())
    plain = next(r for r in report["results"] if r["backend"] == "torch-uint8")
    plain["vs_synthetic"] = 0.5
    report["results"].append({**plain, "name": "torch-uint8 +TA", "auto_augment": "trivial_augment_wide",
                              "vs_synthetic": 0.99})  # fmt: skip
    (tmp_path / "bench_train_rn18.json").write_text(json.dumps(report))
    tabled = run_tool("tools.gpu_report", str(tmp_path), check=True).stdout
    assert "| torch-uint8 +TA | " in tabled
    assert re.search(r"fed by torch-uint8 >= 95% of synthetic: NOT met \(best 0\.500, torch-uint8\)", tabled), tabled
