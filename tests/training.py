"""Running the trainer as users do, for the tests: torchrun, argument lists, two nodes on one machine."""

from __future__ import annotations

import itertools
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT, subprocess_env
from train.checkpoint import load_checkpoint
from train.config import load_config
from train.schedule import learning_rate

# Runs small enough for 2 cores: 32 px images, batches of 8, one loader thread.
TINY = [
    "resolution.min=32", "resolution.max=32", "resolution.val=32", "data.batch_size=8", "eval.batch_size=8",
    "data.workers=1", "log.every=2", "optim.lr=0.2",
]  # fmt: skip


def torchrun(*args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone` with `nproc` processes on this machine, its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = subprocess_env(OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(shards: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`-m train` with the demo config made TINY, reading `shards` and writing `run_dir`."""
    return ["-m", "train", "--config", "configs/demo.yaml", f"data.shards={shards}", f"run.dir={run_dir}", *TINY,
            *overrides]  # fmt: skip


def popen(args: list[str], **kw) -> subprocess.Popen:
    env = subprocess_env(OMP_NUM_THREADS="1")
    return subprocess.Popen(args, cwd=REPO_ROOT, env=env, text=True, **kw)


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_val_count(shards: Path) -> int:
    return json.loads((shards / "manifest.json").read_text())["splits"]["val"]["samples"]


def logged_rates_follow_the_schedule(output: str, overrides: list[str], global_batch: int) -> int:
    """Assert that each log line's learning rate (`epoch E step S/N | ... | lr X |`) is the schedule's
    at step S of epoch E (the rate of the step before the line); return how many lines there were."""
    cfg = load_config(REPO_ROOT / "configs/demo.yaml", [*TINY, *overrides])
    lines = re.findall(r"^epoch (\d+) step (\d+)/(\d+) \|.*\| lr (\S+) \|", output, re.M)
    for epoch, step, steps, logged in lines:
        position = int(epoch) * int(steps) + int(step) - 1
        expected = learning_rate(position, int(steps), cfg.train.epochs, cfg.peak_lr(global_batch), cfg.schedule)
        assert logged == f"{expected:.4g}", f"epoch {epoch} step {step}/{steps}: lr {logged}, schedule {expected}"
    return len(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*node_args: list[str], timeout: float = 120, roots: tuple[Path, ...] = ()) -> list[tuple[int, str]]:
    """Run one torchrun per argument list, as the two nodes of one job: (exit status, output) of each.

    `roots`: each node's copy of the project (default: this one), from which it runs."""
    port = _free_port()
    launchers = []
    for args, root in itertools.zip_longest(node_args, roots[: len(node_args)], fillvalue=REPO_ROOT):
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes"]
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", *rendezvous]
        env = subprocess_env(OMP_NUM_THREADS="1") | {"PYTHONPATH": str(root)}
        launchers.append(
            subprocess.Popen(
                [*command, *args], cwd=root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [launcher.communicate(timeout=timeout)[0] for launcher in launchers]
    return [(launcher.returncode, output) for launcher, output in zip(launchers, outputs, strict=True)]
