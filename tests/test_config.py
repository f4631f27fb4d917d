"""The trainer's configuration: what its keys hand the loaders, and errors that name the key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, run_tool, subprocess_env
from tests.training import train_args
from train.config import ConfigError, config_changes, load_config
from train.trainer import main as train_main


def test_the_train_loader_is_given_the_data_settings():
    """What `train` hands its loaders: each data setting, and the train or val size and batch."""
    data = ["data.aug_repeats=3", "data.auto_augment=rand_augment", "data.rand_augment_ops=4",
            "data.rand_augment_magnitude=12", "data.interpolation=bicubic"]  # fmt: skip
    overrides = [*data, "resolution.min=96", "resolution.max=128", "eval.batch_size=5"]
    cfg = load_config(REPO_ROOT / "configs/demo.yaml", overrides)
    train = cfg.loader_config("train", torch.device("cpu"))
    assert (train.aug_repeats, train.image_size, train.batch_size, train.dtype) == (
        3,
        96,
        cfg.data.batch_size,
        "float32",
    )
    assert (train.augment.name, train.augment.ops, train.augment.magnitude) == ("rand_augment", 4, 12)
    val = cfg.loader_config("val", torch.device("cpu"))
    assert (val.val_image_size, val.batch_size) == (cfg.resolution.val, 5)
    assert train.interpolation == val.interpolation == "bicubic"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "unknown key 'optim.lrr'; valid keys: optimizer, lr, lr_batch"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("data.backend=pillow", "data.backend: 'pillow' is not one of ['dali-gpu', 'dali-cpu'"),
        ("data.val_backend=folder", "data.val_backend: 'folder' cannot read what data.backend 'dali-cpu' reads"),
        ("train.stop_when={top1: 70}", "train.stop_when.top1: unknown metric"),
        ("data.batch_size=0", "data.batch_size: must be at least 1"),
        ("checkpoint.every_steps=-1", "checkpoint.every_steps: must be 0 (off) or more, got -1"),
        ("checkpoint.every_minutes=-5", "checkpoint.every_minutes: must be 0 (off) or more, got -5.0"),
        ("checkpoint.keep_best=-2", "checkpoint.keep_best: must be 0 (off) or more, got -2"),
        ("log.profile_start=-1", "log.profile_start: must be 0 or more, got -1"),
        ("optim.lr=[1,", "override 'optim.lr=[1,': not valid YAML"),
        ("optim.random_erase=1.5", "optim.random_erase: must be a probability in [0, 1], got 1.5"),
        ("schedule.min_lr=-1", "schedule.min_lr: must be 0 or more, got -1.0"),
        # Each of these ran before: to a non-finite loss (nan), silently (a negative weight decay,
        # gradient clip or warmup), or into a message on min_lr (lr) or a ValueError traceback (momentum).
        ("optim.lr=-0.1", "optim.lr: must be 0 or more, got -0.1"),
        ("optim.label_smoothing=.nan", "optim.label_smoothing: must be a finite number, got nan"),
        ("optim.lr=.inf", "optim.lr: must be a finite number, got inf"),
        ("optim.momentum=-0.9", "optim.momentum: must be in [0, 1), got -0.9"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay: must be 0 (off) or more, got -0.0001"),
        ("optim.grad_clip=-1", "optim.grad_clip: must be 0 (off) or more, got -1"),
        ("schedule.warmup_epochs=-1", "schedule.warmup_epochs: must be 0 (off) or more, got -1"),
        ("optim.lr_batch=-256", "optim.lr_batch: must be 0 or more, got -256"),
        ("optim.optimizer=lars", "optim.optimizer: 'lars' is not one of ['sgd', 'adamw', 'rmsprop', 'lamb']"),
        ("data.interpolation=lanczos", "data.interpolation: 'lanczos' is not one of ['bilinear', 'bicubic']"),
        ("data.hw_decoder_load=1.5", "data.hw_decoder_load must be in [0, 1], got 1.5"),
        ("data.crop_pct=0", "data.crop_pct must be in (0, 1], got 0.0"),
        ("resolution.min=0", "resolution.min: must be at least 1, got 0"),
        (
            "data.auto_augment=randaugment",
            "data.auto_augment: 'randaugment' is not one of ['none', 'trivial_augment_wide', 'rand_augment', 'auto_aug",
        ),
        (
            "data.rand_augment_magnitude=31",
            "data.rand_augment_magnitude must be a bin from 0 to 30, got 31",
        ),
    ],
)
def test_config_errors_name_the_key(override, message, tmp_path, capsys):
    """The command line's own entry point, called in this process (the next test runs `python -m
    train` itself): seven interpreters importing torch would add most of a minute to the suite."""
    assert train_main(["--config", str(REPO_ROOT / "configs/demo.yaml"), f"run.dir={tmp_path}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists(), "nothing starts before the config is valid"


def test_a_floor_above_the_peak_learning_rate_is_a_config_error(photo_shards, tmp_path, capsys):
    """schedule.min_lr is checked against the peak once the global batch is known (it scales the lr)."""
    args = train_args(photo_shards, tmp_path / "run", "schedule.min_lr=0.01", "optim.lr=0.1", "optim.lr_batch=256")
    assert train_main(args[2:]) == 2
    expected = "schedule.min_lr 0.01 exceeds the peak learning rate 0.003125 (optim.lr 0.1 for 256 images, scaled"
    assert expected in capsys.readouterr().err


def test_a_broken_yaml_file_or_an_impossible_run_dir_is_a_config_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [0.1,\n")
    result = run_tool("train", "--config", str(broken))
    assert result.returncode == 2 and f"{broken}: not valid YAML" in result.stderr, result.stderr
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    result = run_tool("train", "--config", "configs/demo.yaml", f"run.dir={in_the_way / 'run'}")
    assert result.returncode == 2 and f"run.dir: cannot create {in_the_way / 'run'}" in result.stderr, result.stderr


def test_a_config_file_is_utf8_with_or_without_a_byte_order_mark(tmp_path):
    """Saved by a Windows editor with a byte-order mark, it reads as without; in Latin-1 it is a config
    error naming the file (it was a UnicodeDecodeError traceback, or under a Latin-1 locale misread)."""
    demo = (REPO_ROOT / "configs" / "demo.yaml").read_bytes()
    marked = tmp_path / "marked.yaml"
    marked.write_bytes(b"\xef\xbb\xbf" + demo)
    assert load_config(marked).to_dict() == load_config(REPO_ROOT / "configs" / "demo.yaml").to_dict()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(demo + "# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"--config {latin1}: not UTF-8 text (byte 0xe9 at offset ")):
        load_config(latin1)


def test_help_lists_every_config_key_and_print_config_resolves_without_training(tmp_path):
    help_text = run_tool("train", "--help", check=True).stdout
    settings = load_config(None).to_dict()
    for section, values in settings.items():
        for key, default in values.items():
            assert f"  {section}.{key}: {json.dumps(default)} (" in help_text, f"{section}.{key} in --help"
    assert 'optim.loss: "cross_entropy" (str)' in help_text and "one of: cross_entropy, bce" in help_text

    overrides = ["optim.lr=0.3", "optim.loss=bce", f"run.dir={tmp_path / 'run'}"]
    printed = run_tool("train", "--config", "configs/resnet18.yaml", "--print-config", *overrides, check=True).stdout
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    assert load_config(resolved).to_dict() == load_config("configs/resnet18.yaml", overrides).to_dict()
    assert not (tmp_path / "run").exists(), "printing the config starts nothing"
    wrong = run_tool("train", "--config", "configs/resnet18.yaml", "--print-config", "optim.loss=focal")
    assert wrong.returncode == 2 and "optim.loss: 'focal' is not one of" in wrong.stderr


def test_missing_tensorboard_is_a_config_error(photo_shards, tmp_path):
    """A machine without TensorBoard (a package that fails to import) and log.tensorboard on."""
    blocker = tmp_path / "site" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no tensorboard on this machine')\n")
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env["PYTHONPATH"]])
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, *train_args(photo_shards, run_dir, "train.epochs=1")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "log.tensorboard is true but TensorBoard cannot be imported" in result.stderr
    assert not run_dir.exists(), "nothing is written before the check"


def test_config_changes_name_each_changed_and_each_new_setting():
    before = load_config(REPO_ROOT / "configs/demo.yaml").to_dict()
    after = load_config(REPO_ROOT / "configs/demo.yaml", ["data.batch_size=7", "train.stop_when={acc1: 50}"]).to_dict()
    del before["optim"]["ema_decay"]  # as in a checkpoint written before that setting existed
    assert config_changes(before, after) == [
        f"data.batch_size: {before['data']['batch_size']} -> 7",
        "optim.ema_decay: (not set) -> 0.0",
        f"train.stop_when: {before['train']['stop_when']} -> {{'acc1': 50.0}}",
    ]
    assert config_changes(after, after) == []
