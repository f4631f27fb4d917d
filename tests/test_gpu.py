"""Checks that need a CUDA GPU; skipped elsewhere. Run on the GPU machine by tools/gpu_check.sh."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.loader import LoaderConfig, create_loader
from tests.conftest import run_tool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# nvJPEG (GPU) and libjpeg-turbo (CPU) may round the IDCT differently: a few grey levels at most.
GPU_CPU_DECODE_MEAN_ABS = 0.03


def collect(loader):
    loader.set_epoch(0)
    batches = list(loader)
    loader.close()
    return batches


def assert_dali_gpu_matches_dali_cpu(
    shards, split: str, auto_augment: str = "none", interpolation: str = "bilinear"
) -> None:
    outputs = {}
    for backend in ("dali-gpu", "dali-cpu"):
        settings = dict(auto_augment=auto_augment, interpolation=interpolation)
        cfg = LoaderConfig(backend=backend, batch_size=8, workers=4, val_image_size=224, dtype="float32", **settings)
        outputs[backend] = collect(create_loader(str(shards), split, cfg, device="cuda"))
    for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(*outputs.values(), strict=True):
        assert gpu_images.is_cuda and gpu_images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(gpu_labels, cpu_labels)
        assert (gpu_images - cpu_images).abs().mean() <= GPU_CPU_DECODE_MEAN_ABS


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_gpu_matches_dali_cpu(photo_shards, split, interpolation):
    """Val, and train too: crops and flips are drawn on the host, the same for both decoders (bicubic
    resizes not yet run on a GPU when written, 2026-12-07)."""
    assert_dali_gpu_matches_dali_cpu(photo_shards, split, interpolation=interpolation)


@pytest.mark.parametrize(
    "suite", ["trivial_augment_wide", "rand_augment", "auto_augment_imagenet", "rand_augment_timm"]
)
@pytest.mark.parametrize("stored", ["jpeg", "raw"])
def test_auto_augment_on_dali_gpu_matches_dali_cpu(raw_and_jpeg_shards, stored, suite):
    """The operations are drawn on the host: the GPU graph applies the CPU graph's, with DALI's GPU
    kernels (not yet run on a GPU when written: 2026-12-06, timm's RandAugment 2026-12-07)."""
    raw, jpeg = raw_and_jpeg_shards
    assert_dali_gpu_matches_dali_cpu(raw if stored == "raw" else jpeg, "train", suite)


def test_exact_eval_and_predict_on_gpu_equal_cpu(photo_shards, tmp_path):
    """Same checkpoint, same decoded inputs (dali-cpu), float32: GPU and CPU counts agree exactly, and
    tools.predict's batches scored on the GPU give the CPU's top five (not yet run on a GPU when
    written: 2026-12-07)."""
    run = tmp_path / "run"
    run_tool(
        "train", "--config", "configs/demo.yaml", f"data.shards={photo_shards}", f"run.dir={run}",
        "train.epochs=1", "data.backend=dali-gpu", "resolution.min=64", "resolution.max=64", "resolution.val=64",
        "log.tensorboard=false", check=True,
    )  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["train/gpu_memory_gib"] for r in records if "train/loss" in r]
    assert peaks and all(0 < peak < torch.cuda.get_device_properties(0).total_memory / 2**30 for peak in peaks)
    results = {}
    for device in ("cuda", "cpu"):
        env_device = {} if device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
        out = run_tool(
            "train.evaluate", "--checkpoint", str(run / "last.pt"), "--shards", str(photo_shards),
            "--backend", "dali-cpu", "--precision", "float32", "--batch-size", "8", "--workers", "4",
            check=True, env=env_device,
        )  # fmt: skip
        results[device] = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["cuda"]["samples"] == results["cpu"]["samples"]
    assert results["cuda"]["acc1"] == results["cpu"]["acc1"]
    assert results["cuda"]["acc5"] == results["cpu"]["acc5"]
    assert results["cuda"]["loss"] == pytest.approx(results["cpu"]["loss"], rel=1e-4)

    pictures = sorted(str(path) for path in (photo_shards.parent / "src" / "val").rglob("*.JPEG"))[:24]
    predicted = {}
    for device in ("cuda", "cpu"):
        out = run_tool(
            "tools.predict", "--checkpoint", str(run / "last.pt"), "--device", device, "--precision", "float32",
            "--batch-size", "8", "--workers", "2", "--json", *pictures, check=True,
        )  # fmt: skip
        predicted[device] = [json.loads(line) for line in out.stdout.splitlines()]
    assert [row["image"] for row in predicted["cuda"]] == pictures
    for on_gpu, on_cpu in zip(predicted["cuda"], predicted["cpu"], strict=True):
        assert on_gpu["top5_probs"] == pytest.approx(on_cpu["top5_probs"], rel=1e-3, abs=1e-6)
        probs = on_cpu["top5_probs"]
        for k, (gpu_class, cpu_class) in enumerate(zip(on_gpu["top5"], on_cpu["top5"], strict=True)):
            neighbours = probs[max(k - 1, 0) : k] + probs[k + 1 : k + 2]
            tied = any(abs(probs[k] - other) <= 1e-3 * probs[k] for other in neighbours)
            # Classes of near-equal probability may swap places (the last with the unlisted sixth).
            assert gpu_class == cpu_class or tied or k == len(probs) - 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_raw_pixels_on_dali_gpu_match_dali_cpu(raw_and_jpeg_shards, split):
    """Stored pixels skip the decoder: copied to the GPU and cropped there, as the CPU graph crops them."""
    raw, _ = raw_and_jpeg_shards
    assert_dali_gpu_matches_dali_cpu(raw, split)


@pytest.mark.parametrize("split", ["train", "val"])
def test_torch_uint8_on_gpu_matches_cpu(raw_and_jpeg_shards, split):
    """The side-stream copy and normalization on the GPU give the CPU loader's batches (same uint8
    pixels from the workers), over two epochs of one loader (the workers persist). One worker and a
    prefetch of one leave three batch buffers for eight steps an epoch: each is refilled while
    copies from the others may still be queued on the GPU."""
    raw, _ = raw_and_jpeg_shards
    cfg = LoaderConfig(backend="torch-uint8", batch_size=2, workers=1, prefetch=1, dtype="float32")
    loaders = {device: create_loader(str(raw), split, cfg, device=device) for device in ("cuda", "cpu")}
    for epoch in (0, 1):
        outputs = {}
        for device, loader in loaders.items():
            loader.set_epoch(epoch)
            outputs[device] = []
            for images, labels in loader:
                assert images.device.type == device and images.is_contiguous(memory_format=torch.channels_last)
                outputs[device].append((images.cpu(), labels.cpu()))
        assert len(outputs["cuda"]) == len(outputs["cpu"]) > 0
        for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(*outputs.values(), strict=True):
            assert torch.equal(gpu_labels, cpu_labels)
            assert (gpu_images - cpu_images).abs().max() <= 1e-5
    for loader in loaders.values():
        loader.close()
