"""The run's record: console lines, TensorBoard event files, metrics.jsonl, and the run.dir's lock.
Rank 0 only.

Other ranks get a `SilentLog`, so no code path on them can write by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from shards.folder_lock import FolderInUse, lock_folder
from shards.tar_writer import write_atomically
from train.config import Config, ConfigError, config_yaml

METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".run.lock"  # held by rank 0 of the run writing here
RUN_PACKAGES = ("pipeline", "shards", "train")  # the code a training or evaluation run executes


class RunLogError(RuntimeError):
    """A record of the run that cannot be written (a full disk); the message names the file."""


def _write_record(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        raise record_write_error(path, err) from err


def record_write_error(path: Path, err: OSError) -> RunLogError:
    """The error that stops a run whose record `path` cannot be written (the checkpoints are kept)."""
    return RunLogError(
        f"cannot write {path} ({err.strerror or err}); the checkpoints beside it are kept: "
        "free space, then continue with --resume auto"
    )


class SilentLog:
    """What ranks other than 0 log: nothing."""

    def line(self, text: str) -> None:
        pass

    def start_at(self, global_step: int) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def histograms(self, step: int, model: torch.nn.Module) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog(SilentLog):
    def __init__(self, run_dir: Path, config: Config):
        writer_class = _summary_writer_class() if config.log.tensorboard else None  # fails before any file is made
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file in the way, no permission
            raise ConfigError(f"run.dir: cannot create {run_dir} ({err.strerror})") from None
        self.lock = _lock_run_dir(run_dir)
        _write_record(run_dir / "config.yaml", config_yaml(config))
        _write_record(run_dir / "code_version.txt", f"{_code_version()}\nsource digest {source_digest()}\n")
        self.run_dir = run_dir
        self.writer_class = writer_class
        self.metrics = None  # opened by start_at, once the first step is known
        self.tensorboard = None
        self.histograms_enabled = config.log.histograms

    def start_at(self, global_step: int) -> None:
        """Record from `global_step` on, dropping what an earlier attempt in this run.dir logged after it.

        A run that died after its last checkpoint (a lost node, kill -9) logged steps that the resumed
        run trains again; kept, they would appear twice in metrics.jsonl and double back in TensorBoard.
        """
        metrics_path = self.run_dir / METRICS_NAME
        if metrics_path.is_file():
            kept, dropped = _records_up_to(metrics_path.read_text(), global_step)
            if dropped:
                try:
                    write_atomically(metrics_path, "".join(kept).encode())
                except OSError as err:
                    raise record_write_error(metrics_path, err) from err
                self.line(
                    f"dropped {dropped} record(s) of {metrics_path} logged after step {global_step} by an earlier "
                    "attempt (TensorBoard hides its events after that step too)"
                )
        self.metrics = open(metrics_path, "a", buffering=1)
        if self.writer_class is not None:
            _quiet_event_writer_thread()
            with self._writing_tensorboard():
                # purge_step: TensorBoard hides the earlier event files' events at this step and after.
                self.tensorboard = self.writer_class(str(self.run_dir / "tensorboard"), purge_step=global_step + 1)

    def line(self, text: str) -> None:
        print(text, flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        try:
            self.metrics.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        except OSError as err:
            raise record_write_error(self.run_dir / METRICS_NAME, err) from err
        if self.tensorboard is not None:
            with self._writing_tensorboard():
                for tag, value in values.items():
                    self.tensorboard.add_scalar(tag, value, step)
                self.tensorboard.flush()

    def histograms(self, step: int, model: torch.nn.Module) -> None:
        if self.tensorboard is not None and self.histograms_enabled:
            with self._writing_tensorboard():
                for name, param in model.named_parameters():
                    self.tensorboard.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
                self.tensorboard.flush()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tensorboard is not None:
            with self._writing_tensorboard():
                self.tensorboard.flush()
                self.tensorboard.close()
        self.lock.close()

    @contextlib.contextmanager
    def _writing_tensorboard(self) -> Iterator[None]:
        """A full disk under the event files is named as for the other records. The writer's thread
        writes them; `flush` waits for it and raises its error here, so the step that wrote is the
        step that fails."""
        try:
            yield
        except OSError as err:
            raise record_write_error(self.run_dir / "tensorboard", err) from err


def create_run_log(run_dir: str | Path, config: Config, is_main: bool) -> SilentLog:
    return RunLog(Path(run_dir), config) if is_main else SilentLog()


def _lock_run_dir(run_dir: Path) -> TextIO:
    """Hold an exclusive lock on `run_dir` while this process lives, so that a second run started
    there (a job submitted twice) is refused instead of overwriting this one's checkpoints."""
    try:
        return lock_folder(run_dir, LOCK_NAME)
    except FolderInUse as holder:
        raise ConfigError(
            f"run.dir: {run_dir} is in use by another run ({holder}): wait for it to end, or give another run.dir"
        ) from None


def _records_up_to(text: str, global_step: int) -> tuple[list[str], int]:
    """The lines of a metrics.jsonl logged at `global_step` or before, and how many others there were.

    A line cut short by a crash (no valid JSON) counts among the others."""
    kept, dropped = [], 0
    for line in text.splitlines(keepends=True):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if isinstance(step, int) and step <= global_step and line.endswith("\n"):
            kept.append(line)
        else:
            dropped += 1
    return kept, dropped


def source_digest() -> str:
    """The first 16 hex digits of a sha256 over the Python files of `RUN_PACKAGES` (relative path and
    bytes, in path order): the same digest, the same code, in a git checkout or not."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(p for package in RUN_PACKAGES for p in (root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def software_facts() -> dict[str, str]:
    """The code and the library versions a rank runs, for the ranks to compare (and the run to record)."""
    dali = sys.modules.get("nvidia.dali")
    return {
        "code: digest of " + ", ".join(f"{p}/" for p in RUN_PACKAGES): source_digest(),
        "python": "{}.{}".format(*sys.version_info),  # a patch release apart is no reason to stop
        "torch": torch.__version__,
        "torchvision": sys.modules["torchvision"].__version__ if "torchvision" in sys.modules else "not imported",
        "nvidia.dali": dali.__version__ if dali is not None else "not imported",
    }


def _code_version() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True)
        return commit + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return f"unknown (no git); python {sys.version.split()[0]}"


def _quiet_event_writer_thread() -> None:
    """Leave TensorBoard's writer thread's failures to the main thread, which raises them again at
    its next write or flush (`RunLog._writing_tensorboard`): printed by the thread as well, a full
    disk would be reported twice, once as a raw traceback. Other threads' errors print as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writer", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        from_writer = type(args.thread).__module__ == "tensorboard.summary.writer.event_file_writer"
        if not (from_writer and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiets_event_writer = True
    threading.excepthook = hook


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            f"log.tensorboard is true but TensorBoard cannot be imported ({err}): "
            "pip install tensorboard, or set log.tensorboard=false"
        ) from err
    return SummaryWriter
