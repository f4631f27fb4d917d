"""Shared fixtures: real ImageNet photographs when ../shared has them, generated JPEGs otherwise."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

# One intra-op thread for torch, here and in every child process, unless a test sets another. The
# suite's training runs share 2 cores with their loader workers and DALI threads; torch's second
# thread spun against them (half the time in the kernel), and with one the training tests ran up to
# twice as fast (the whole suite 13:08 -> 11:43 on the CI machine). torchrun sets the same for its
# ranks. Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tools.make_demo_data import build_demo_imagenet, real_sample_images

REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """The environment for a child process: the repository first on PYTHONPATH, what was there kept,
    `extra` set (a value of None removes the variable)."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path)
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_tool(
    module: str, *args: str, check: bool = False, timeout: float = 300, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` from the repository root, as a user would."""
    env = subprocess_env(**(env or {}))
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def run_with_file_size_limit(limit: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository root with no file allowed past `limit` bytes
    (RLIMIT_FSIZE): writes past it fail with EFBIG, as on a disk that fills up."""

    def limit_file_size() -> None:  # in the child, before it runs Python
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=timeout, preexec_fn=limit_file_size,
    )  # fmt: skip


@pytest.fixture(scope="session")
def real_photos() -> dict[str, Path]:
    """wnid -> real ILSVRC-2012 photograph; empty where ../shared/data/imagenet-sample is absent."""
    return real_sample_images()


@pytest.fixture(scope="session")
def demo_imagenet(tmp_path_factory) -> Path:
    """A small ImageNet layout (10 classes; train foldered, val flat + labels), built once per session."""
    return build_demo_imagenet(tmp_path_factory.mktemp("demo-imagenet"), num_classes=10, train_per_class=8)


def make_photo_tree(root: Path, photos: dict[str, Path], demo_imagenet: Path, num_classes: int) -> Path:
    """train/<wnid>/ and val/<wnid>/ of real photographs (one per class), or of the demo images without them."""
    if photos:
        for wnid, photo in sorted(photos.items())[:: max(1, len(photos) // num_classes)][:num_classes]:
            for split in ("train", "val"):
                (root / split / wnid).mkdir(parents=True)
                (root / split / wnid / photo.name).symlink_to(photo)
    else:
        import shutil

        shutil.copytree(demo_imagenet / "train", root / "train")
        shutil.copytree(demo_imagenet / "train", root / "val")
    return root


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory, real_photos, demo_imagenet) -> Path:
    """Shards (train and val, several shards each) of 100 real photographs, or of the demo set."""
    root = tmp_path_factory.mktemp("photo-shards")
    tree = make_photo_tree(root / "src", real_photos, demo_imagenet, num_classes=100)
    out = root / "shards"
    # About five shards per split whichever images there are (real photographs are ~100x larger).
    source_mb = sum(p.stat().st_size for p in (tree / "train").rglob("*.JPEG")) / 1e6
    run_tool(
        "tools.make_shards", "--train", str(tree / "train"), "--val", str(tree / "val"), "--out", str(out),
        "--shard-size-mb", f"{source_mb / 5:.4f}", "--workers", "2", "--no-progress", check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def raw_and_jpeg_shards(tmp_path_factory, real_photos, demo_imagenet) -> tuple[Path, Path]:
    """The same 16 photographs converted twice, one shard per split: as JPEG, and as raw pixels
    (`--train-raw-pixels --val-raw-pixels`, with a limit no photograph reaches, so nothing is resized)."""
    root = tmp_path_factory.mktemp("raw-pixels")
    tree = make_photo_tree(root / "src", real_photos, demo_imagenet, num_classes=16)
    common = ["--train", str(tree / "train"), "--val", str(tree / "val"), "--shard-size-mb", "100000"]
    common += ["--workers", "2", "--no-progress"]
    run_tool("tools.make_shards", *common, "--out", str(root / "jpeg"), check=True)
    raw = ["--train-raw-pixels", "--val-raw-pixels", "--max-short-side", "100000"]
    run_tool("tools.make_shards", *common, *raw, "--out", str(root / "raw"), check=True)
    return root / "raw", root / "jpeg"
