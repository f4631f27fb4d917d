"""The benchmark scripts run and report what they promise (rates are not asserted: no timed tests)."""

import json
import re

import pytest

from tests.conftest import run_tool


@pytest.fixture(scope="module")
def bench_out(photo_shards, tmp_path_factory):
    """One short run of each benchmark, JSON files named as tools/gpu_check.sh names them."""
    out = tmp_path_factory.mktemp("bench-out")
    pipeline = run_tool(
        "tools.bench_pipeline", "--shards", str(photo_shards), "--backends", "dali-gpu,dali-cpu,torch,synthetic",
        "--batch-size", "8", "--image-size", "64", "--seconds", "0.3", "--workers", "2",
        "--json", str(out / "bench_pipeline.json"), "--hw-decoder-load", "0.65,1", check=True,
    )  # fmt: skip
    train = run_tool(
        "tools.bench_train", "--shards", str(photo_shards), "--backends", "dali-gpu,dali-cpu", "--batch-size", "4",
        "--image-size", "32", "--seconds", "0.3", "--workers", "2", "--json", str(out / "bench_train_rn18.json"),
        check=True,
    )  # fmt: skip
    return out, pipeline.stdout, train.stdout


def test_bench_pipeline_reports_every_backend_and_split(bench_out):
    out, stdout, _ = bench_out
    report = json.loads((out / "bench_pipeline.json").read_text())
    measured = {(r["backend"], r["split"]) for r in report["results"]}
    assert {("dali-cpu", "train"), ("torch", "val"), ("synthetic", "train")} <= measured
    assert all(r["images_per_s"] > 0 and r["vs_torch"] > 0 for r in report["results"])
    assert report["environment"]["dali"] and report["environment"]["torch"]
    assert "vs torch" in stdout
    if not report["environment"]["gpu"]:
        for load in ("0.65", "1"):
            assert re.search(rf"dali-gpu hw={load} +train skipped: no GPU", stdout)


def test_bench_train_reports_the_data_stall(bench_out):
    out, _, stdout = bench_out
    report = json.loads((out / "bench_train_rn18.json").read_text())
    gpu = report["environment"]["gpu"]
    assert [r["backend"] for r in report["results"]] == ["dali-gpu"] * bool(gpu) + ["dali-cpu", "synthetic"]
    assert report["results"][-1]["vs_synthetic"] == 1.0
    assert all(0.0 <= r["data_wait_fraction"] < 1.0 for r in report["results"])
    assert "data stall" in stdout


def test_gpu_report_tables_every_figure_and_each_target(bench_out, tmp_path):
    out, _, _ = bench_out
    result = run_tool("tools.gpu_report", str(out), "--write", str(tmp_path / "report.md"), check=True)
    assert (tmp_path / "report.md").read_text() == result.stdout
    pipeline = json.loads((out / "bench_pipeline.json").read_text())
    for r in pipeline["results"]:
        assert f"| {r['name']} | {r['split']} | {r['images_per_s']:,.0f} |" in result.stdout
    assert "- dali-gpu train >= 16,500 images/s: " in result.stdout
    assert "- resnet18, batch 4 fed by dali-gpu >= 95% of synthetic: " in result.stdout
    if not pipeline["environment"]["gpu"]:
        assert "dali-gpu train >= 16,500 images/s: not measured" in result.stdout


def test_gpu_report_names_a_folder_without_results(tmp_path):
    result = run_tool("tools.gpu_report", str(tmp_path))
    assert result.returncode == 1
    assert f"{tmp_path}: no bench_pipeline.json or bench_train_*.json" in result.stderr
