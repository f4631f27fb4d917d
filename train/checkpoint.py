"""Atomic, complete, versioned checkpoints, loadable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from shards.tar_writer import fsync_dir

CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


def rng_state() -> dict:
    """This process's random states, as tensors and plain values (weights_only-loadable)."""
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[-2], tuple(python[:-2]), python[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """torch.save to a temporary file, fsync, rename: a crash or full disk never leaves a broken file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"version": CHECKPOINT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    version = checkpoint.get("version")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {version!r}, this code reads {CHECKPOINT_VERSION}")
    return checkpoint
