"""Stopping and resuming: signals, killed ranks, torchrun restarts, full disks, kept and best
checkpoints, stop criteria."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.loader import LoaderConfig, create_loader
from pipeline.split import EarlierSplit
from tests.conftest import run_tool, run_with_file_size_limit
from tests.training import logged_rates_follow_the_schedule, model_weights, popen, read_metrics, train_args
from train.checkpoint import keep_copy, load_checkpoint, save_checkpoint
from train.config import load_config
from train.resume import resume_point, saved_steps_per_epoch
from train.run_log import create_run_log
from train.trainer import _targets_met
from train.trainer import main as train_main


def sigterm_at(args: list[str], line_start: str) -> tuple[int, str]:
    """Run `python <args>`, send SIGTERM once a line of its output starts with `line_start`, and
    return its exit status and the output after that line."""
    process = popen([sys.executable, *args], stdout=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith(line_start):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.communicate(timeout=120)[0]
    return process.returncode, rest


def test_resume_after_sigterm_gives_identical_weights(photo_shards, tmp_path):
    """With TrivialAugment, random erasing, MixUp, CutMix and stochastic depth on: their draws, too,
    continue where they were."""
    augment = ("data.auto_augment=trivial_augment_wide", "optim.random_erase=0.25", "optim.mixup_alpha=0.2",
               "optim.cutmix_alpha=1.0", "model.drop_path=0.2")  # fmt: skip
    overrides = ("train.epochs=2", "eval.every=2", *augment)
    straight = tmp_path / "straight"
    finished = popen([sys.executable, *train_args(photo_shards, straight, *overrides)])
    assert finished.wait(timeout=300) == 0

    interrupted = tmp_path / "interrupted"
    status, rest = sigterm_at(train_args(photo_shards, interrupted, *overrides), "epoch 0 step 4/")
    assert status == 0
    assert "stopped by SIGTERM at epoch 0 step 6" in rest
    checkpoint = load_checkpoint(interrupted / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (0, 6), "saved mid-epoch with its data position"

    # Resumed in the straight run's directory, as if that run had died after its step-6 checkpoint:
    # it logged steps the resumed run trains again, and only the resumed run's records may remain.
    expected = model_weights(straight / "last.pt")
    straight_records = read_metrics(straight)
    shutil.copy(interrupted / "last.pt", tmp_path / "at-step-6.pt")
    resumed = popen([sys.executable, *train_args(photo_shards, straight, *overrides), "--resume",
                     str(tmp_path / "at-step-6.pt")], stdout=subprocess.PIPE)  # fmt: skip
    output = resumed.communicate(timeout=300)[0]
    assert "resumed from" in output and resumed.returncode == 0
    assert f"settings that differ from the checkpoint's: run.dir: {interrupted} -> {straight}\n" in output
    got = model_weights(straight / "last.pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resume is exact"

    after_step_6 = sum(r["step"] > 6 for r in straight_records)
    assert f"dropped {after_step_6} record(s) of {straight / 'metrics.jsonl'} logged after step 6" in output
    records = read_metrics(straight)
    assert [r["step"] for r in records] == [r["step"] for r in straight_records], "each step once, in order"
    assert [r.get("train/loss") for r in records] == [r.get("train/loss") for r in straight_records]
    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["train/loss"])) for r in records if "train/loss" in r]


def test_a_run_stopped_at_an_epochs_last_step_resumes_into_its_evaluation(photo_shards, tmp_path):
    """Stopped at the very end of an epoch (its last step is the first log step, where a stop is
    taken), the resumed run has no batch of it left to read: it evaluates that epoch, tells no pace
    from an epoch it trained no step of, and trains the next."""
    steps = json.loads((photo_shards / "manifest.json").read_text())["splits"]["train"]["samples"] // 8
    args = train_args(photo_shards, tmp_path / "run", f"log.every={steps}", "train.epochs=2", "eval.every=1")
    status, rest = sigterm_at(args, "training ")  # before the first step
    assert status == 0 and f"stopped by SIGTERM at epoch 0 step {steps};" in rest, rest

    resumed = run_tool(*args[1:], "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {tmp_path / 'run' / 'last.pt'}: epoch 0 step {steps}\n" in resumed.stdout
    lines = resumed.stdout.splitlines()
    epoch_0 = next(line for line in lines if line.startswith("epoch 0 took "))
    assert "left for" not in epoch_0, epoch_0
    assert not any(line.startswith("epoch 0 step ") for line in lines), "no step of epoch 0 trained again"
    assert any(line.startswith("epoch 0 val: ") for line in lines) and any(line.startswith("done: ") for line in lines)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_a_run_resumed_with_fewer_steps_per_epoch_goes_on_at_the_same_share_of_the_epoch(photo_shards, tmp_path):
    """Stopped at step 6, resumed with batches of 4 and optim.accumulate=4: an epoch now has half
    the steps, as on twice the processes. The run goes on at the same share of the epoch, and the
    learning rate with it (until 2026-12-07 the rate was read from the global step, and step 6 was
    taken as step 6 of the shorter epoch); its loader, split in batches of 4, reads the samples the
    stopped run had not (tests/test_loaders.py checks which)."""
    args = train_args(photo_shards, tmp_path / "run", "train.epochs=2")
    status, rest = sigterm_at(args, "epoch 0 step 4/")
    assert status == 0 and "stopped by SIGTERM at epoch 0 step 6;" in rest, rest
    steps = load_checkpoint(tmp_path / "run" / "last.pt")["steps_per_epoch"]

    changes = ["data.batch_size=4", "optim.accumulate=4"]
    resumed = run_tool(*args[1:], *changes, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    halved, at = steps // 2, 6 * (steps // 2) // steps
    expected = f"an epoch had {steps} steps in the checkpoint's run and has {halved} in this one: epoch 0 goes on at"
    assert f"{expected} step {at}, the same share of it\n" in resumed.stdout, resumed.stdout
    expected = "epoch 0 goes on with the samples the checkpoint's run had not read (it split the epoch over 1"
    assert f"{expected} process(es) in batches of 8 and had read 6 each)\n" in resumed.stdout, resumed.stdout
    assert logged_rates_follow_the_schedule(resumed.stdout, ["train.epochs=2", *changes], 16) >= 2
    final = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (final["epoch"], final["global_step"]) == (2, 6 + halved - at + halved), "each step of the rest once"


def test_a_run_in_this_process_puts_the_signal_handlers_back(photo_shards, tmp_path):
    """train.trainer.main called as a function handles SIGTERM and SIGINT only while it runs. Left
    installed, its handlers went on into processes forked later, where a multiprocessing Pool's
    terminate() (it sends SIGTERM) no longer ended the workers: the suite hung in tools.make_shards."""
    signals = (signal.SIGTERM, signal.SIGINT)
    before = [signal.getsignal(sig) for sig in signals]
    assert train_main(train_args(photo_shards, tmp_path / "run", "train.epochs=1", "log.tensorboard=false")[2:]) == 0
    assert [signal.getsignal(sig) for sig in signals] == before


@pytest.mark.parametrize("backend", ["torch", "torch-uint8"])
def test_sigterm_to_the_whole_process_group_still_saves(photo_shards, tmp_path, backend):
    """Slurm's scancel (and a terminal's Ctrl-C) signals every process, DataLoader workers included:
    the workers must outlive the signal so the trainer can read its next batch, checkpoint and stop."""
    run_dir = tmp_path / "run"
    args = train_args(photo_shards, run_dir, f"data.backend={backend}", "train.epochs=3", "eval.every=1")
    process = popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    for line in process.stdout:
        if line.startswith("epoch 1 step 4/"):
            os.killpg(process.pid, signal.SIGTERM)
            break
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 0, rest
    assert "stopped by SIGTERM at epoch 1 step 6" in rest
    assert "done:" not in rest, "a stopped run does not report itself finished (epoch 0 was evaluated)"
    assert load_checkpoint(run_dir / "last.pt")["step_in_epoch"] == 6


def test_a_second_run_in_a_run_dir_in_use_is_refused(photo_shards, tmp_path):
    """A job submitted twice: the second is refused, naming the first, which goes on untouched."""
    run_dir = tmp_path / "run"
    first = popen([sys.executable, *train_args(photo_shards, run_dir, "train.epochs=50")], stdout=subprocess.PIPE)
    for line in first.stdout:
        if line.startswith("training resnet18"):
            break
    second = run_tool(*train_args(photo_shards, run_dir, "train.epochs=50")[1:], "--resume", "auto")
    first.send_signal(signal.SIGTERM)
    rest = first.communicate(timeout=120)[0]
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"run.dir: {run_dir} is in use by another run (pid {first.pid} on " in second.stderr
    assert first.returncode == 0 and "stopped by SIGTERM" in rest


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_at_a_checkpoint_is_named_and_leaves_no_file(photo_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt.tmp").symlink_to("/dev/full")  # where the checkpoint is written before its rename
    result = run_tool(*train_args(photo_shards, run_dir, "train.epochs=1")[1:])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"checkpoint error: cannot write {run_dir / 'last.pt'} (No space left on device)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "last.pt").exists() and not (run_dir / "last.pt.tmp").exists()


def test_a_disk_that_fills_up_partway_through_a_checkpoint_is_named(tmp_path):
    """Writes fail partway through torch.save (a file size limit: EFBIG past it, as on a disk that
    fills up), where torch's zip writer raises a RuntimeError of its own ("unexpected pos"): the
    error still names the file and the system's reason, the checkpoint there is unchanged and no
    temporary file is left."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"weight": torch.zeros(10)}})
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import torch
        from train.checkpoint import CheckpointError, save_checkpoint
        try:
            save_checkpoint({str(path)!r}, {{"model": {{"weight": torch.zeros(1_000_000)}}}})
        except CheckpointError as err:
            print(err)
    """)
    result = run_with_file_size_limit(1_000_000, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cannot write {path} (File too large); the file there, if any, is unchanged"
    assert path.read_bytes() == before and not path.with_name("last.pt.tmp").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_at_a_log_line_is_named_in_one_line(photo_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    result = run_tool(*train_args(photo_shards, run_dir, "train.epochs=1")[1:])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"train: log error: cannot write {run_dir / 'metrics.jsonl'} (No space left on device)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_full_disk_under_the_tensorboard_files_is_named_in_one_line(photo_shards, tmp_path):
    """Files may not grow past 50 kB (RLIMIT_FSIZE: writes then fail with EFBIG, as on a full disk):
    the weight histograms of the first evaluation pass that in TensorBoard's writer thread, before
    any checkpoint is written. The run stops there with exit status 2 and one line naming the
    folder: no traceback, from that thread or the main one."""
    run_dir = tmp_path / "run"
    result = run_with_file_size_limit(
        50_000, *train_args(photo_shards, run_dir, "train.epochs=1", "log.histograms=true")
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"train: log error: cannot write {run_dir / 'tensorboard'} (File too large)" in result.stderr
    assert "Traceback" not in result.stderr and "epoch 0 val:" not in result.stdout
    assert not (run_dir / "last.pt").exists()


def test_a_full_disk_at_a_profile_is_named_in_one_line(photo_shards, tmp_path):
    """log.profile_steps: the Chrome trace (about 1 MB unpacked) passes a 500 kB file size limit
    (RLIMIT_FSIZE, as a full disk): exit status 2, one line naming the profile, no traceback, and
    no half-written profile file."""
    run_dir = tmp_path / "run"
    overrides = ["train.epochs=1", "log.profile_steps=2", "log.profile_start=1", "log.tensorboard=false"]
    result = run_with_file_size_limit(500_000, *train_args(photo_shards, run_dir, *overrides))
    assert result.returncode == 2, result.stdout + result.stderr
    stem = run_dir / "profile" / "rank0-steps-1-2"
    # torch.profiler's trace writer fails with a message of its own and raises nothing
    assert f"train: log error: cannot write {stem}.* (torch.profiler wrote no trace: a full disk?" in result.stderr
    assert "Traceback" not in result.stderr
    assert [path.name for path in (run_dir / "profile").iterdir()] == [f"{stem.name}.txt"]  # written before the trace


def start_and_kill_rank_1(torchrun_args: list[str], after_line: str) -> subprocess.Popen:
    """Launch torchrun, wait for a log line from rank 0, then SIGKILL the worker with RANK=1."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *torchrun_args]
    launcher = popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in launcher.stdout:
        if line.startswith(after_line):
            break
    victim = next(pid for pid in _children(launcher.pid) if _environ(pid).get("RANK") == "1")
    os.kill(victim, signal.SIGKILL)
    return launcher


def test_killed_rank_ends_the_job_within_seconds(photo_shards, tmp_path):
    launcher = start_and_kill_rank_1(train_args(photo_shards, tmp_path / "run", "train.epochs=50"), "epoch 0 step 2/")
    killed_at = time.monotonic()
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 30


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize("links", ["allowed", "refused"])
def test_a_kept_checkpoint_stays_as_it_was_when_last_pt_is_replaced(tmp_path, monkeypatch, links):
    """A hard link where the filesystem allows one, else a copy; either way a complete file."""

    def refuse(*args):  # as a filesystem without hard links does
        raise PermissionError(1, "Operation not permitted")

    if links == "refused":
        monkeypatch.setattr(os, "link", refuse)
    last = tmp_path / "last.pt"
    save_checkpoint(last, {"epoch": 1})
    keep_copy(last, tmp_path / "epoch-1.pt")
    save_checkpoint(last, {"epoch": 2})
    assert load_checkpoint(tmp_path / "epoch-1.pt")["epoch"] == 1 and load_checkpoint(last)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1.pt", "last.pt"]


def test_stop_criteria_compare_in_the_right_direction():
    assert _targets_met({"acc1": 76.0, "acc5": 95.5, "loss": 1.0}, {"acc1": 75, "acc5": 95})
    assert not _targets_met({"acc1": 76.0, "acc5": 94.0, "loss": 1.0}, {"acc1": 75, "acc5": 95})
    assert _targets_met({"acc1": 1.0, "acc5": 1.0, "loss": 0.9}, {"loss": 1.0}), "lower loss is better"
    assert not _targets_met({"acc1": 1.0, "acc5": 1.0, "loss": 1.1}, {"loss": 1.0})
    assert not _targets_met({"acc1": 99.0, "acc5": 99.0, "loss": 0.1}, {})


def test_training_stops_once_the_targets_are_met(photo_shards, tmp_path):
    overrides = ("train.epochs=5", "eval.every=1", "train.stop_when={loss: 1000}")
    result = run_tool(*train_args(photo_shards, tmp_path / "run", *overrides)[1:], check=True)
    assert "stop criteria {'loss': 1000.0} met after epoch 0" in result.stdout
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_the_best_epochs_checkpoints_are_kept_and_a_resumed_run_knows_its_own(photo_shards, tmp_path, capsys):
    """checkpoint.keep_best=2 over 4 evaluated epochs keeps the two best (earlier first among equal
    scores), linked from each epoch's last.pt; going back to epoch 2 relinks its own file, drops a
    missing one, and names (and leaves) the files it did not write."""
    run_dir = tmp_path / "run"
    keep = ("eval.every=1", "checkpoint.keep_best=2", "checkpoint.keep_every_epochs=1")
    assert train_main(train_args(photo_shards, run_dir, "train.epochs=4", *keep)[2:]) == 0
    scores = {r["epoch"] + 1: r["val/acc1"] for r in read_metrics(run_dir) if "val/acc1" in r}
    assert sorted(scores) == [1, 2, 3, 4]
    best_two = sorted(scores, key=lambda epoch: (-scores[epoch], epoch))[:2]
    assert load_checkpoint(run_dir / "last.pt")["best_kept"] == [[scores[e], e] for e in best_two]
    assert sorted(p.name for p in run_dir.glob("best-epoch-*.pt")) == sorted(f"best-epoch-{e}.pt" for e in best_two)
    for epoch in best_two:
        assert (run_dir / f"best-epoch-{epoch}.pt").read_bytes() == (run_dir / f"epoch-{epoch}.pt").read_bytes()

    # Epoch 2's checkpoint kept epochs 1 and 2. As if the run had stopped before linking epoch 2's
    # file and epoch 1's had been removed since; a file of another run lies beside them.
    assert load_checkpoint(run_dir / "epoch-2.pt")["best_kept"] == [[scores[e], e] for e in sorted(
        (1, 2), key=lambda epoch: (-scores[epoch], epoch))]  # fmt: skip
    for epoch in (1, 2):
        (run_dir / f"best-epoch-{epoch}.pt").unlink(missing_ok=True)
    keep_copy(run_dir / "epoch-4.pt", run_dir / "best-epoch-9.pt")
    capsys.readouterr()
    resumed = train_args(photo_shards, run_dir, "train.epochs=3", *keep)[2:] + ["--resume", str(run_dir / "epoch-2.pt")]
    assert train_main(resumed) == 0
    out = capsys.readouterr().out
    assert f"{run_dir / 'best-epoch-1.pt'} is missing: no longer among the best kept" in out
    others = sorted({f"best-epoch-{e}.pt" for e in best_two if e > 2} | {"best-epoch-9.pt"})
    assert f"{', '.join(others)} in {run_dir} are not among the best epochs kept by the checkpoint" in out
    assert (run_dir / "best-epoch-2.pt").read_bytes() == (run_dir / "epoch-2.pt").read_bytes()
    resumed_scores = {r["epoch"] + 1: r["val/acc1"] for r in read_metrics(run_dir) if "val/acc1" in r}
    expected = sorted((2, 3), key=lambda epoch: (-resumed_scores[epoch], epoch))
    assert load_checkpoint(run_dir / "last.pt")["best_kept"] == [[resumed_scores[e], e] for e in expected]
    assert (run_dir / "best-epoch-3.pt").read_bytes() == (run_dir / "epoch-3.pt").read_bytes()
    assert (run_dir / "best-epoch-9.pt").is_file() and not (run_dir / "best-epoch-1.pt").exists()


def test_torchrun_restart_resumes_from_the_last_checkpoint(photo_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ("train.epochs=2", "checkpoint.every_steps=2")
    launcher = start_and_kill_rank_1(
        ["--max-restarts=1", *train_args(photo_shards, run_dir, *overrides)], "epoch 0 step 4/"
    )
    rest = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, rest
    assert "resumed from" in rest
    checkpoint = load_checkpoint(run_dir / "last.pt")
    steps_per_epoch = create_loader(
        str(photo_shards), "train", LoaderConfig("torch", batch_size=8), 0, 2
    ).steps_per_epoch
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 2 * steps_per_epoch


def test_timed_checkpoints_are_saved_at_log_steps(photo_shards, tmp_path):
    """checkpoint.every_minutes: once the time has passed, last.pt is saved at the next log step."""
    run_dir = tmp_path / "run"
    settings = ["train.epochs=1", "log.every=10", "checkpoint.every_minutes=0.000001"]
    result = run_tool(*train_args(photo_shards, run_dir, *settings)[1:], check=True)
    saved = re.findall(r"saved \S+last\.pt at epoch 0 step (\d+)\n", result.stdout)
    steps_per_epoch = load_checkpoint(run_dir / "last.pt")["global_step"]
    assert [int(step) for step in saved] == list(range(10, steps_per_epoch + 1, 10))


def test_an_older_checkpoint_tells_its_epoch_length_from_its_position():
    """Checkpoints written before they recorded steps_per_epoch: from epoch 1 on, the global step
    counted each step of the epochs before; in epoch 0 the length cannot be told."""
    assert saved_steps_per_epoch({"epoch": 2, "step_in_epoch": 5, "global_step": 2 * 12 + 5}) == 12
    assert saved_steps_per_epoch({"epoch": 0, "step_in_epoch": 5, "global_step": 5}) is None
    assert saved_steps_per_epoch({"epoch": 0, "step_in_epoch": 5, "global_step": 5, "steps_per_epoch": 9}) == 9


def written_at(step_in_epoch: int, world_size: int, batch_size: int, steps_per_epoch: int | None, **more) -> dict:
    """The position and settings of a checkpoint written in epoch 3 (as train.trainer saves them)."""
    config = load_config("configs/demo.yaml", [f"data.batch_size={batch_size}"]).to_dict()
    checkpoint = {
        "epoch": 3, "step_in_epoch": step_in_epoch, "global_step": 100, "best_acc1": 12.5, "best_kept": [[2, 12.5]],
        "world_size": world_size, "config": config,
    }  # fmt: skip
    if steps_per_epoch is not None:
        checkpoint["steps_per_epoch"] = steps_per_epoch
    return checkpoint | more


@pytest.mark.parametrize(
    "now, world_size, steps_per_epoch, step, reads_the_rest",
    [
        ([], 2, 12, 5, False),  # the same split: the unbroken order goes on
        ([], 4, 6, 2, True),  # twice the processes: half the steps, the same share of the epoch
        (["data.batch_size=4", "optim.accumulate=2"], 2, 12, 5, True),  # as many steps, other batches
        (["train.seed=1"], 2, 12, 5, True),  # another seed orders the epoch otherwise
        (["data.aug_repeats=2"], 2, 12, 5, True),
        (["data.backend=synthetic"], 4, 6, 2, False),  # nothing to read
    ],
)
def test_a_resume_goes_on_at_the_same_share_of_the_epoch_and_reads_the_rest(
    now, world_size, steps_per_epoch, step, reads_the_rest
):
    """train.resume.resume_point: the checkpoint (2 processes, batches of 8, step 5 of 12) mapped onto
    this run's steps, and the checkpoint's split handed to the loaders wherever this run's differs."""
    checkpoint = written_at(5, world_size=2, batch_size=8, steps_per_epoch=12)
    cfg = load_config("configs/demo.yaml", ["data.batch_size=8", *now])
    resumed = resume_point(checkpoint, cfg, world_size, steps_per_epoch)
    assert resumed.position == {**checkpoint_position(checkpoint), "step_in_epoch": step}
    expected = EarlierSplit(world_size=2, batch_size=8, batches_read=5, seed=0, repeats=1)
    assert resumed.earlier_split == (expected if reads_the_rest else None)
    rescaled = f"an epoch had 12 steps in the checkpoint's run and has 6 in this one: epoch 3 goes on at step {step}"
    assert resumed.notes == ([f"{rescaled}, the same share of it"] if steps_per_epoch != 12 else [])


def test_a_resume_on_another_conversion_of_the_shards_says_so():
    """The checkpoint records which conversion its run read (manifest.json's digest); resumed on
    another, the run says so, and mid-epoch, that the rest of the epoch cannot match what was read."""
    demo = load_config("configs/demo.yaml", ["data.batch_size=8"])
    mid_epoch = written_at(5, world_size=2, batch_size=8, steps_per_epoch=12, shards_digest="aaaa")
    assert resume_point(mid_epoch, demo, 2, 12, "aaaa").notes == []
    assert resume_point(mid_epoch, demo, 2, 12, "bbbb").notes == [
        "note: data.shards holds another conversion than the checkpoint's run read (manifest.json sha256 bbbb, "
        "was aaaa); the rest of epoch 3 follows the new shards' order, so it may read again samples read before "
        "the stop and miss others"
    ]
    epoch_end = written_at(12, world_size=2, batch_size=8, steps_per_epoch=12, shards_digest="aaaa")
    assert resume_point(epoch_end, demo, 2, 12, "bbbb").notes == [
        "note: data.shards holds another conversion than the checkpoint's run read (manifest.json sha256 bbbb, "
        "was aaaa)"
    ]
    older = written_at(5, world_size=2, batch_size=8, steps_per_epoch=12)  # before checkpoints held the digest
    assert resume_point(older, demo, 2, 12, "bbbb").notes == []


def checkpoint_position(checkpoint: dict) -> dict:
    return {key: checkpoint[key] for key in ("epoch", "step_in_epoch", "global_step", "best_acc1", "best_kept")}


def test_a_resume_at_an_epochs_end_or_start_reads_nothing_of_an_earlier_split():
    """Stopped after the last step of an epoch (before its evaluation), the new split has nothing of
    it left to read; stopped at step 0, nothing was read. An older checkpoint without its epoch
    length, in epoch 0 at a step past this run's epoch end, has that epoch done; and one without
    best_kept keeps none."""
    demo = load_config("configs/demo.yaml", ["data.batch_size=8"])
    done = resume_point(written_at(12, world_size=2, batch_size=8, steps_per_epoch=12), demo, 4, 6)
    assert (done.position["step_in_epoch"], done.earlier_split) == (6, None)
    start = resume_point(written_at(0, world_size=2, batch_size=8, steps_per_epoch=12), demo, 4, 6)
    assert (start.position["step_in_epoch"], start.earlier_split, start.notes) == (0, None, [])
    older = written_at(20, world_size=1, batch_size=8, steps_per_epoch=None, epoch=0, global_step=20)
    del older["best_kept"]
    resumed = resume_point(older, demo, 2, 12)
    assert (resumed.position["step_in_epoch"], resumed.earlier_split) == (12, None)
    assert resumed.position["best_kept"] == []
    assert resumed.notes == ["an epoch had 20 steps in the checkpoint's run and has 12 in this one: epoch 0 goes on "
                             "at step 12, the same share of it"]  # fmt: skip


def test_a_run_that_cannot_stop_in_its_grace_period_exits_on_its_own(photo_shards, tmp_path):
    """A signalled run stops at its next log step; one that cannot get there within
    run.signal_grace_s (a rank stuck in a collective; here, log steps an epoch apart and a grace of
    1 s) exits with status 143 and says why, writing no checkpoint. A second signal exits at once."""
    steps = json.loads((photo_shards / "manifest.json").read_text())["splits"]["train"]["samples"] // 8

    def signalled(run_dir: Path, grace_s: int, signals: int) -> tuple[int, str]:
        """Run until training starts, send SIGTERM (again once the run has said it received one)."""
        slower = ["resolution.min=64", "resolution.max=64", "resolution.val=64"]  # an epoch of seconds
        args = train_args(photo_shards, run_dir, f"log.every={steps}", f"run.signal_grace_s={grace_s}", *slower)
        process = popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, sent = [], 0
        for line in process.stdout:
            output.append(line)
            # the run's stderr line may follow stdout's unfinished one on the same line
            if sent < signals and (line.startswith("training ") or "received SIGTERM" in line):
                process.send_signal(signal.SIGTERM)
                sent += 1
                if sent == signals:
                    break
        output.append(process.communicate(timeout=120)[0])
        return process.returncode, "".join(output)

    status, output = signalled(tmp_path / "slow", grace_s=1, signals=1)
    assert status == 143, output
    assert "received SIGTERM: saving and stopping at the next log interval (forced exit in 1 s)" in output
    assert "no clean stop within 1 s of SIGTERM: exiting" in output
    assert not list((tmp_path / "slow").glob("*.pt*")), "no checkpoint, whole or partial"

    status, output = signalled(tmp_path / "twice", grace_s=600, signals=2)
    assert status == 143 and "no clean stop" not in output, output
    assert not list((tmp_path / "twice").glob("*.pt*"))


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_when_the_run_resumes(tmp_path, capsys):
    """A run killed while writing metrics.jsonl leaves a last line without its end; the resumed run
    keeps the records up to its checkpoint's step and drops the rest, that line included."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [json.dumps({"step": step, "train/loss": 1.0}) + "\n" for step in (2, 4, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(records) + '{"step": 8, "train/lo')
    log = create_run_log(run_dir, load_config("configs/demo.yaml", ["log.tensorboard=false"]), is_main=True)
    log.start_at(4)
    log.close()
    assert (run_dir / "metrics.jsonl").read_text() == "".join(records[:2])
    assert f"dropped 2 record(s) of {run_dir / 'metrics.jsonl'} logged after step 4" in capsys.readouterr().out
