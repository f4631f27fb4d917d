"""The benchmark scripts run and report what they promise (rates are not asserted: no timed tests)."""

import json
import re

from tests.conftest import run_tool


def test_bench_pipeline_reports_every_backend_and_split(photo_shards, tmp_path):
    out = tmp_path / "pipeline.json"
    result = run_tool(
        "tools.bench_pipeline", "--shards", str(photo_shards), "--backends", "dali-gpu,dali-cpu,torch,synthetic",
        "--batch-size", "8", "--image-size", "64", "--seconds", "0.3", "--workers", "2", "--json", str(out),
        "--hw-decoder-load", "0.65,1", check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    measured = {(r["backend"], r["split"]) for r in report["results"]}
    assert {("dali-cpu", "train"), ("torch", "val"), ("synthetic", "train")} <= measured
    assert all(r["images_per_s"] > 0 and r["vs_torch"] > 0 for r in report["results"])
    assert report["environment"]["dali"] and report["environment"]["torch"]
    assert "vs torch" in result.stdout
    if not report["environment"]["gpu"]:
        for load in ("0.65", "1"):
            assert re.search(rf"dali-gpu hw={load} +train skipped: no GPU", result.stdout)


def test_bench_train_reports_the_data_stall(photo_shards, tmp_path):
    out = tmp_path / "train.json"
    result = run_tool(
        "tools.bench_train", "--shards", str(photo_shards), "--backends", "dali-cpu", "--batch-size", "4",
        "--image-size", "32", "--seconds", "0.3", "--workers", "2", "--json", str(out), check=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["results"]] == ["dali-cpu", "synthetic"]
    assert report["results"][1]["vs_synthetic"] == 1.0
    assert all(0.0 <= r["data_wait_fraction"] < 1.0 for r in report["results"])
    assert "data stall" in result.stdout
