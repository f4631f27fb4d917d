"""Atomic, complete, versioned checkpoints, loadable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from shards.tar_writer import fsync_dir
from train.distributed import DistContext, all_gather_objects

CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, of another version, of another model or classes, or
    cannot be written; the message names the file."""


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
    """The payload with this code's checkpoint version, saved atomically (`save_atomically`)."""
    save_atomically(path, {"version": CHECKPOINT_VERSION, **payload})


def save_atomically(path: str | Path, contents: dict) -> None:
    """torch.save to a temporary file, fsync, rename: a crash or full disk never leaves a broken file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(contents, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk, a quota: the message alone would not say which file
        cause = write_error(err)
        if cause is None:
            raise
        raise CheckpointError(
            f"cannot write {path} ({cause.strerror or cause}); the file there, if any, is unchanged"
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`, if any. A disk that fills up partway through `torch.save` surfaces as
    a RuntimeError of its zip writer ("unexpected pos ...") raised while handling the OSError."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def keep_copy(path: Path, copy: Path) -> None:
    """Keep the checkpoint at `path` also as `copy`: a hard link (no bytes written; `path` is only
    ever replaced by a rename, so the copy keeps this version), or a copy where links are refused."""
    tmp = copy.with_name(copy.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, copy)
    except OSError as err:
        raise CheckpointError(f"cannot write {copy} ({err.strerror or err}); {path} is unchanged") from err
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(copy.parent)


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint at `path`, or a `CheckpointError` that says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code: not here.
        raise CheckpointError(
            f"{path}: not a checkpoint of this project (torch.load with weights_only=True refuses it: objects "
            "other than tensors and plain values, or not a pickle at all)"
        ) from None
    except (RuntimeError, EOFError) as err:  # what torch.load raises for a truncated or corrupt file
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_reason(err)})") from None
    except Exception as err:  # unpickling bytes that are no pickle fails in many ways: b"hello" is a KeyError
        raise CheckpointError(
            f"{path}: not a checkpoint of this project (neither torch.save's zip format nor a pickle: "
            f"{type(err).__name__} in torch.load)"
        ) from None
    version = checkpoint.get("version") if isinstance(checkpoint, dict) else None
    if (
        version is None
        and isinstance(checkpoint, dict)
        and checkpoint
        and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    ):
        raise CheckpointError(
            f"{path}: a weights file (a state_dict, as tools.export_weights writes), not a training checkpoint: "
            "give it as --weights beside the checkpoint it came from, or as model.init_from"
        )
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {version!r}, this code reads {CHECKPOINT_VERSION}")
    return checkpoint


def _reason(err: Exception) -> str:
    """The first sentence of torch.load's own error, else the error's type (a KeyError's text is a number)."""
    first = str(err).split(".")[0]
    return first if isinstance(err, (RuntimeError, EOFError, pickle.UnpicklingError)) and first else type(err).__name__


def load_weights(model: torch.nn.Module, path: str | Path, option: str = "model.init_from") -> None:
    """Copy the weights at `path`, given by `option`, into `model` (strictly: every key, every shape).

    `path` holds a plain state_dict (`tools.export_weights`, torchvision's weight files) or a
    checkpoint of this project (its model's weights; for its EMA's, export them with --ema first).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{option}: not found: {path}")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # as in load_checkpoint, a file that is no pickle fails in many ways
        raise CheckpointError(
            f"{option}: {path}: not a weights file torch.load can read safely ({_reason(err)})"
        ) from None
    is_checkpoint = isinstance(contents, dict) and "version" in contents and "model" in contents
    state = contents["model"] if is_checkpoint else contents
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{option}: {path}: neither a state_dict nor a checkpoint of this project")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        problems = [
            f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
            if keys
        ]
        raise CheckpointError(
            f"{option}: {path}: its weights do not fit the model (model.name, model.blurpool, the class count): "
            f"{'; '.join(problems)}"
        )
    model.load_state_dict(state)


def check_same_model(checkpoint: dict, path: str | Path, model_name: str, blurpool: bool) -> None:
    """Resuming needs the checkpoint's architecture; say so before load_state_dict's list of keys."""
    saved = checkpoint["config"]["model"]
    saved_blurpool = saved.get("blurpool", False)
    if (saved["name"], saved_blurpool) != (model_name, blurpool):
        raise CheckpointError(
            f"{path}: holds {_model_text(saved['name'], saved_blurpool)}; this run builds "
            f"{_model_text(model_name, blurpool)} (model.name, model.blurpool)"
        )


def check_same_optimizer(checkpoint: dict, path: str | Path, optimizer: str) -> None:
    """The optimizer's state (SGD's momentum, AdamW's moments) resumes only into the same optimizer."""
    saved = checkpoint["config"]["optim"].get("optimizer", "sgd")  # older checkpoints: SGD, the only one then
    if saved != optimizer:
        raise CheckpointError(
            f"{path}: holds the state of {saved}; this run uses {optimizer} (optim.optimizer): resume with "
            f"optim.optimizer={saved}, or start a new run.dir"
        )


def _model_text(name: str, blurpool: bool) -> str:
    return f"{name} {'with' if blurpool else 'without'} BlurPool"


def saved_num_classes(checkpoint: dict) -> int:
    """How many classes the checkpoint's model scores (checkpoints before this record were ResNets)."""
    return checkpoint.get("num_classes") or checkpoint["model"]["fc.weight"].shape[0]


def trained_interpolation(checkpoint: dict) -> str:
    """The resize filter the checkpoint's model was trained with (bilinear before data.interpolation)."""
    return checkpoint["config"]["data"].get("interpolation", "bilinear")


def check_same_classes(checkpoint: dict, path: str | Path, num_classes: int, wnids: list[str], data: str) -> None:
    """Label i must mean the same class to the checkpoint and to `data`: the same count, and the same
    wnids where both record them. Otherwise a resumed run learns the wrong names, and an evaluation
    scores against them, without an error."""
    saved_classes = saved_num_classes(checkpoint)
    if saved_classes != num_classes:
        raise CheckpointError(f"{path}: a model of {saved_classes} classes; {data} has {num_classes}")
    saved_wnids = [wnid for wnid, _ in checkpoint.get("classes") or []]
    if saved_wnids and wnids and saved_wnids != wnids:
        first = next(i for i, (a, b) in enumerate(zip(saved_wnids, wnids, strict=True)) if a != b)
        raise CheckpointError(f"{path}: class {first} is {saved_wnids[first]}; in {data} it is {wnids[first]}")


def check_ranks_agree_on_checkpoint(path: Path | None, checkpoint: dict | None, ctx: DistContext) -> None:
    """Raise on every rank, naming what each one read, unless all start from the same position.

    `checkpoint` is what this rank loaded from `path` (None: no checkpoint). Each rank reads the
    checkpoint itself, so run.dir must be a directory every node sees. On a node's own disk the
    other nodes find no last.pt and start afresh while rank 0 resumes: their step counts differ, and they
    hang at a collective (two torchrun "nodes" on one machine, before this check: still waiting when
    killed after 4.5 minutes).
    """
    if not ctx.distributed:
        return
    if checkpoint is None:
        agreed, view = None, "no checkpoint"
    else:
        agreed = (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["global_step"])
        view = f"{path} at epoch {agreed[0]} step {agreed[1]}"
    views = all_gather_objects((agreed, f"rank {ctx.rank} on {socket.gethostname()}: {view}"), ctx)
    if len({agreed for agreed, _ in views}) > 1:
        raise CheckpointError(
            "the ranks would not start from the same checkpoint (" + "; ".join(text for _, text in views) + "): "
            "run.dir, and any checkpoint path given, must be on a filesystem that every node sees"
        )
