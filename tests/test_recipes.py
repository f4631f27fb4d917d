"""The shipped recipes: they follow the runs they cite (FFCV's configs, torchvision's command), and
the ResNet-18 one trains and evaluates."""

from __future__ import annotations

import pytest

from pipeline.transforms import val_resize_size
from tests.conftest import REPO_ROOT, run_tool
from train.config import load_config
from train.schedule import learning_rate, train_image_size

# From libffcv/ffcv-imagenet's rn18_configs/rn18_16_epochs.yaml and rn50_configs/rn50_40_epochs.yaml:
# global batch, lr for that batch, epochs, and the train size of each epoch by FFCV's get_resolution
# (160 px, then 192 px once the ramp's midpoint rounds to it: "160px until 75% of training").
FFCV_RUNS = {
    "resnet18": {"global_batch": 1024, "lr": 0.5, "epochs": 16, "sizes": [160] * 12 + [192] * 4},
    "resnet50": {"global_batch": 4096, "lr": 1.7, "epochs": 40, "sizes": [160] * 32 + [192] * 8},
}


@pytest.mark.parametrize("name", sorted(FFCV_RUNS))
def test_a_recipe_follows_the_ffcv_run_it_cites(name):
    cfg = load_config(REPO_ROOT / "configs" / f"{name}.yaml")
    ffcv = FFCV_RUNS[name]
    assert cfg.model.name == name and cfg.model.blurpool and cfg.eval.flip
    assert not cfg.model.zero_init_residual, "FFCV builds torchvision's models with their default init"
    assert cfg.train.epochs == ffcv["epochs"]
    assert [train_image_size(epoch, cfg.resolution) for epoch in range(cfg.train.epochs)] == ffcv["sizes"]
    assert cfg.resolution.val == 256 and cfg.optim.label_smoothing == 0.1

    peak = cfg.peak_lr(ffcv["global_batch"])
    assert peak == pytest.approx(ffcv["lr"])
    steps = 100  # per epoch; the schedule is per iteration
    lrs = [learning_rate(s, steps, cfg.train.epochs, peak, cfg.schedule) for s in range(steps * cfg.train.epochs)]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(ffcv["lr"])
    assert lrs.index(max(lrs)) == 2 * steps, "peak after 2 epochs (FFCV's lr_peak_epoch)"
    assert lrs[-1] == pytest.approx(ffcv["lr"] / (steps * (cfg.train.epochs - 2)))  # linear to zero at the end


def test_the_torchvision_recipe_follows_its_command():
    """torchvision's IMAGENET1K_V2 command for ResNet-50 (8 x 128 images, --lr 0.5 --lr-scheduler
    cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide --epochs 600
    --random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1
    --mixup-alpha 0.2 --cutmix-alpha 1.0 --train-crop-size 176 --model-ema --val-resize-size 232
    --ra-sampler --ra-reps 4), with its defaults: momentum 0.9, warmup from 0.01 x lr, EMA decay
    0.99998 every 32 steps scaled by batch x 32 / epochs."""
    cfg = load_config(REPO_ROOT / "configs" / "torchvision-resnet50.yaml")
    assert cfg.model.name == "resnet50" and not cfg.model.zero_init_residual and not cfg.model.blurpool
    assert cfg.train.epochs == 600 and cfg.optim.optimizer == "sgd" and cfg.optim.momentum == 0.9
    assert (cfg.optim.weight_decay, cfg.optim.label_smoothing) == (2e-5, 0.1)
    assert (cfg.optim.mixup_alpha, cfg.optim.cutmix_alpha, cfg.optim.random_erase) == (0.2, 1.0, 0.1)
    assert cfg.data.auto_augment == "trivial_augment_wide" and cfg.data.aug_repeats == 4
    assert {train_image_size(epoch, cfg.resolution) for epoch in range(cfg.train.epochs)} == {176}
    assert cfg.resolution.val == 224 and val_resize_size(cfg.resolution.val, cfg.data.crop_pct) == 232
    assert not cfg.eval.flip

    global_batch = 8 * 128
    peak = cfg.peak_lr(global_batch)
    assert peak == pytest.approx(0.5)
    steps = 100  # per epoch
    lrs = [learning_rate(s, steps, cfg.train.epochs, peak, cfg.schedule) for s in range(steps * cfg.train.epochs)]
    assert lrs[0] == pytest.approx(0.01 * 0.5) and lrs.index(max(lrs)) == 5 * steps
    assert lrs[steps * (5 + 595 // 2)] == pytest.approx(0.25, rel=1e-2)  # cosine: half way, half the peak
    assert lrs[-1] < 1e-4

    torchvision_alpha = min(1.0, (1 - 0.99998) * global_batch * 32 / cfg.train.epochs)
    assert cfg.optim.ema_decay**32 == pytest.approx(1 - torchvision_alpha, abs=1e-8)


def test_the_torchvision_mobilenet_recipe_follows_its_command():
    """torchvision's MobileNetV3-Large command (8 x 128 images, --opt rmsprop --lr 0.064 --wd 0.00001
    --lr-step-size 2 --lr-gamma 0.973 --auto-augment imagenet --random-erase 0.2 --epochs 600), with
    its defaults: momentum 0.9, no warmup, no label smoothing, decay on every parameter, 224 px
    center-cropped from 256."""
    cfg = load_config(REPO_ROOT / "configs" / "torchvision-mobilenet-v3-large.yaml")
    assert cfg.model.name == "mobilenet_v3_large" and cfg.train.epochs == 600
    assert (cfg.optim.optimizer, cfg.optim.momentum, cfg.optim.weight_decay) == ("rmsprop", 0.9, 1e-5)
    assert not cfg.optim.no_decay_bn_bias and cfg.optim.label_smoothing == 0.0
    assert (cfg.optim.mixup_alpha, cfg.optim.cutmix_alpha, cfg.optim.random_erase, cfg.optim.ema_decay) == (
        0,
        0,
        0.2,
        0,
    )
    assert cfg.data.auto_augment == "auto_augment_imagenet" and cfg.data.interpolation == "bilinear"
    assert cfg.data.aug_repeats == 1 and not cfg.eval.flip
    assert {train_image_size(epoch, cfg.resolution) for epoch in range(cfg.train.epochs)} == {224}
    assert cfg.resolution.val == 224 and val_resize_size(cfg.resolution.val, cfg.data.crop_pct) == 256

    peak = cfg.peak_lr(8 * 128)
    assert peak == pytest.approx(0.064)
    steps = 10  # per epoch: torchvision's StepLR steps once per epoch, this schedule holds within one
    lrs = [learning_rate(s, steps, cfg.train.epochs, peak, cfg.schedule) for s in range(steps * cfg.train.epochs)]
    for epoch in (0, 1, 2, 3, 599):
        assert lrs[epoch * steps : (epoch + 1) * steps] == [pytest.approx(0.064 * 0.973 ** (epoch // 2))] * steps


# mmpretrain's resnet50_8xb256-rsb-{a1-600e,a2-300e,a3-100e}_in1k and their bases, where they differ:
# epochs, lr for 2048 images, weight decay, MixUp alpha, RandAugment magnitude, drop path, repeats.
RSB_PROCEDURES = {
    "a1": (600, 0.005, 0.01, 0.2, 7, 0.05, 3),
    "a2": (300, 0.005, 0.02, 0.1, 7, 0.05, 3),
    "a3": (100, 0.008, 0.02, 0.1, 6, None, 1),
}


@pytest.mark.parametrize("procedure", sorted(RSB_PROCEDURES))
def test_the_rsb_recipes_follow_mmpretrains_configs(procedure):
    """Alike in all three: 8 x 256 images, Lamb (none on norms and biases; timm's Lamb, which clips
    the gradient norm at 1), LinearLR from 1e-4 over 5 epochs then cosine to 1e-6, BCE (use_sigmoid)
    without smoothing, CutMix 1.0 beside MixUp, RandAugment timm_increasing 2 ops std 0.5, bicubic
    crops to 224, val 236 -> 224, ResNet with zero-initialised last norms."""
    epochs, lr, weight_decay, mixup, magnitude, drop_path, repeats = RSB_PROCEDURES[procedure]
    cfg = load_config(REPO_ROOT / "configs" / f"rsb-{procedure}-resnet50.yaml")
    assert cfg.model.name == "resnet50" and cfg.model.zero_init_residual and not cfg.model.blurpool
    assert cfg.model.drop_path == drop_path and cfg.data.aug_repeats == repeats
    assert (cfg.optim.optimizer, cfg.optim.weight_decay, cfg.optim.no_decay_bn_bias) == ("lamb", weight_decay, True)
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.momentum == 0.9  # momentum: unused by LAMB
    assert (cfg.optim.loss, cfg.optim.label_smoothing, cfg.optim.bce_target_threshold) == ("bce", 0.0, None)
    assert (cfg.optim.mixup_alpha, cfg.optim.cutmix_alpha, cfg.optim.random_erase, cfg.optim.ema_decay) == (
        mixup, 1.0, 0.0, 0.0
    )  # fmt: skip
    augment = (cfg.data.auto_augment, cfg.data.rand_augment_ops, cfg.data.rand_augment_magnitude)
    assert augment == ("rand_augment_timm", 2, magnitude) and cfg.data.rand_augment_magnitude_std == 0.5
    assert cfg.data.interpolation == "bicubic" and not cfg.eval.flip
    assert {train_image_size(epoch, cfg.resolution) for epoch in range(cfg.train.epochs)} == {224}
    assert cfg.resolution.val == 224 and val_resize_size(cfg.resolution.val, cfg.data.crop_pct) == 236

    peak = cfg.peak_lr(8 * 256)
    assert peak == pytest.approx(lr) and cfg.train.epochs == epochs
    steps = 10  # per epoch
    lrs = [learning_rate(s, steps, cfg.train.epochs, peak, cfg.schedule) for s in range(steps * cfg.train.epochs)]
    assert lrs[0] == pytest.approx(lr * 1e-4) and lrs.index(max(lrs)) == 5 * steps
    assert lrs[steps * (5 + (epochs - 5) // 2) + steps // 2] == pytest.approx((lr + 1e-6) / 2, rel=1e-2)
    assert lrs[-1] == pytest.approx(1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_cosine_and_linear_decay_end_at_the_floor(kind):
    """schedule.min_lr (torchvision's --lr-min): the decay runs from the peak to the floor, not to zero."""
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [f"schedule.kind={kind}", "schedule.min_lr=0.001"])
    steps, epochs = 100, cfg.train.epochs
    lrs = [learning_rate(s, steps, epochs, 0.1, cfg.schedule) for s in range(steps * epochs + 1)]
    warmup_end = int(cfg.schedule.warmup_epochs * steps)
    assert lrs[warmup_end] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.001)
    assert min(lrs[warmup_end:]) == pytest.approx(0.001)
    halfway = (warmup_end + steps * epochs) // 2
    assert lrs[halfway] == pytest.approx((0.1 + 0.001) / 2)  # both decays pass the midpoint half way


@pytest.mark.parametrize(
    ("recipe", "name"), [("resnet18", "resnet18"), ("torchvision-mobilenet-v3-large", "mobilenet_v3_large")]
)
def test_a_recipe_trains_and_evaluates(photo_shards, tmp_path, recipe, name):
    """The recipe's own options together, on DALI's CPU path: ResNet-18's BlurPool, flips, label
    smoothing and warmup; MobileNetV3's RMSprop, step decay without warmup, AutoAugment and random
    erasing.

    The ResNet-50 recipes set ResNet-18's options with other numbers (checked above), or timm's parts
    that test_trainer's test_timms_recipe_parts_train_and_resume_from_the_checkpoint trains together;
    training them here too would add 15 s each to the suite for no other code path.
    """
    run_dir = tmp_path / "run"
    result = run_tool(
        "train", "--config", f"configs/{recipe}.yaml", f"data.shards={photo_shards}", f"run.dir={run_dir}",
        "data.backend=dali-cpu", "model.compile=false", "data.batch_size=8", "eval.batch_size=8", "data.workers=2",
        "resolution.min=32", "resolution.max=32", "resolution.val=32", "train.epochs=1", "log.every=2",
        "log.tensorboard=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"training {name} on 1 process(es), cpu" in result.stdout
    assert "epoch 0 val: acc1" in result.stdout
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
