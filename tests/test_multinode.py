"""Two torchrun nodes on one machine: they train together, and the ways they can disagree stop
every rank before a step instead of hanging."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_tool
from tests.training import train_args, two_nodes
from train.checkpoint import load_checkpoint
from train.trainer import main as train_main


def test_two_nodes_on_one_machine_train_together(photo_shards, tmp_path):
    """The second node reads its own copy of the shards, at another path, with more loader threads:
    the ranks compare the manifests' digests, not data.shards, and let each node size its loader."""
    copy = shutil.copytree(photo_shards, tmp_path / "node-b-disk" / "shards")
    node_a = train_args(photo_shards, tmp_path / "run", "train.epochs=1")
    node_b = train_args(copy, tmp_path / "run", "train.epochs=1", "data.workers=2")
    results = two_nodes(node_a, node_b, timeout=300)
    assert all(status == 0 for status, _ in results), results
    assert any("on 2 process(es)" in output for _, output in results)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["world_size"] == 2


def test_a_node_without_the_shards_stops_every_rank_at_once(photo_shards, tmp_path):
    """Shards not mounted on one node: every rank says so in one line and exits 4; before, the other
    rank went on to its first collective (a gloo traceback here; with NCCL, a wait)."""
    missing = tmp_path / "not-mounted"
    for status, output in two_nodes(train_args(photo_shards, tmp_path / "run"), train_args(missing, tmp_path / "run")):
        assert status != 0
        assert f"train: data error: {missing / 'manifest.json'}: no manifest" in output or re.search(
            rf"train: data error: rank \d on \S+: {re.escape(str(missing / 'manifest.json'))}: no manifest", output
        )
        assert "Connection closed by peer" not in output
        assert "exitcode  : 4" in output


@pytest.fixture(scope="module")
def one_epoch_checkpoint(photo_shards, tmp_path_factory) -> Path:
    """last.pt of a one-process run of one epoch over `photo_shards`, in this process."""
    run_dir = tmp_path_factory.mktemp("one-epoch") / "run"
    assert train_main(train_args(photo_shards, run_dir, "train.epochs=1", "log.tensorboard=false")[2:]) == 0
    return run_dir / "last.pt"


@pytest.fixture(scope="module")
def reshuffled_shards(photo_shards, tmp_path_factory) -> Path:
    """The photographs of `photo_shards` converted again with another shuffle seed: same classes and
    counts, another order, so another manifest."""
    out = tmp_path_factory.mktemp("reshuffled") / "shards"
    source = photo_shards.parent / "src"
    run_tool("tools.make_shards", "--train", str(source / "train"), "--val", str(source / "val"), "--out",
             str(out), "--seed", "1", "--workers", "2", "--no-progress", check=True)  # fmt: skip
    return out


def test_nodes_given_different_settings_or_shards_stop_before_training(photo_shards, reshuffled_shards, tmp_path):
    """One node with an edited setting and a conversion of the same photographs with another
    shuffle seed: the step counts match, so before the check the ranks trained on silently (each
    node splitting its own order: some samples read twice per epoch, others never)."""
    results = two_nodes(
        train_args(photo_shards, tmp_path / "run"), train_args(reshuffled_shards, tmp_path / "run", "optim.lr=0.3")
    )
    for status, output in results:
        assert status != 0
        assert "train: config error: the ranks were not given the same run (" in output, output
        assert re.search(
            r"data: manifest.json sha256: '[0-9a-f]{16}' on rank \d \(\S+\); '[0-9a-f]{16}' on rank", output
        )
        assert re.search(r"optim.lr: 0.(2|3) on rank \d \(\S+\); 0.(2|3) on rank \d", output)
        assert "data: train steps per epoch" not in output and "data: classes" not in output
        assert "exitcode  : 2" in output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_nodes_running_different_code_stop_before_training(photo_shards, tmp_path):
    """A node whose copy of the project has one edited file (a `git pull` on one node only)."""
    other_copy = tmp_path / "node-b-checkout"
    for package in ("pipeline", "shards", "train", "tools", "configs"):
        shutil.copytree(REPO_ROOT / package, other_copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    edited = other_copy / "train" / "schedule.py"
    edited.write_text(edited.read_text() + "# edited on this node only\n")
    args = train_args(photo_shards, tmp_path / "run")
    for status, output in two_nodes(args, args, roots=(REPO_ROOT, other_copy)):
        assert status != 0
        assert "train: config error: the ranks were not given the same run (" in output, output
        assert re.search(r"code: digest of pipeline/, shards/, train/: '[0-9a-f]{16}' on rank \d", output)
        assert "every node must run the same code, config and overrides" in output
        assert "python:" not in output and "torch:" not in output  # the same interpreter and libraries


def test_evaluating_nodes_given_different_shards_or_flags_stop_before_scoring(
    one_epoch_checkpoint, photo_shards, reshuffled_shards
):
    """train.evaluate under torchrun: each node names its own --shards; another conversion there
    (the same samples in another order) and another --batch-size are named, not scored."""
    checkpoint = str(one_epoch_checkpoint)
    results = two_nodes(
        *(
            [
                "-m",
                "train.evaluate",
                "--checkpoint",
                checkpoint,
                "--shards",
                str(shards),
                "--workers",
                "1",
                "--batch-size",
                batch,
            ]  # fmt: skip
            for shards, batch in ((photo_shards, "8"), (reshuffled_shards, "4"))
        )
    )
    for status, output in results:
        assert status != 0
        assert "evaluate: error: the ranks were not given the same run (" in output, output
        assert re.search(r"--batch-size: (8|4) on rank \d \(\S+\); (8|4) on rank \d", output)
        assert "data: manifest.json sha256: '" in output and "checkpoint (epoch" not in output
        assert '"acc1"' not in output


def test_nodes_that_see_different_run_dirs_stop_at_once_instead_of_hanging(
    one_epoch_checkpoint, photo_shards, tmp_path
):
    """A run.dir on each node's own disk: one node finds last.pt, the other none. Before the check the
    ranks trained from different positions and hung at a collective for minutes."""
    (tmp_path / "node-a").mkdir()
    shutil.copy(one_epoch_checkpoint, tmp_path / "node-a" / "last.pt")
    results = two_nodes(
        *(
            [*train_args(photo_shards, tmp_path / node, "train.epochs=3", "log.tensorboard=false"), "--resume", "auto"]
            for node in ("node-a", "node-b")
        )
    )
    for status, output in results:
        assert status != 0
        assert "train: checkpoint error: the ranks would not start from the same checkpoint" in output
        assert f"{tmp_path / 'node-a' / 'last.pt'} at epoch 1 step 0" in output and ": no checkpoint" in output
        assert "must be on a filesystem that every node sees" in output
