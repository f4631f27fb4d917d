"""Shared fixtures: real ImageNet photographs when ../shared has them, generated JPEGs otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.make_demo_data import build_demo_imagenet, real_sample_images

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` from the repository root, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
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


@pytest.fixture(scope="session")
def real_photos() -> dict[str, Path]:
    """wnid -> real ILSVRC-2012 photograph; empty where ../shared/data/imagenet-sample is absent."""
    return real_sample_images()


@pytest.fixture(scope="session")
def demo_imagenet(tmp_path_factory) -> Path:
    """A small ImageNet layout (10 classes; train foldered, val flat + labels), built once per session."""
    return build_demo_imagenet(tmp_path_factory.mktemp("demo-imagenet"), num_classes=10, train_per_class=8)
