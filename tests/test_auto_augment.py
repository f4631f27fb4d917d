"""TrivialAugment Wide and RandAugment: torchvision's kernels against DALI's suites, and the loaders
that apply them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image

from pipeline.auto_augment import MAGNITUDE_BINS, OPERATIONS, AutoAugment
from pipeline.dali_pipeline import auto_augment_images
from pipeline.loader import create_loader
from tests.test_loaders import collect, config

SIZE = 96
SUITES = ("trivial_augment_wide", "rand_augment")
# Mean absolute difference (grey levels of 255) allowed between DALI's operation and torch-uint8's
# on one image, inside a one-pixel border. Measured on the sample photographs and on the demo images
# at 96 px, bins 15 and 30 of TrivialAugment's suite: 1.25 at most for color, 1.0 for contrast
# (torchvision rounds the grey mean it blends with; 1.5 at bin 1), 0.75 or less for the others
# (interpolation, rounding), and 0 for the translations, posterize, solarize and equalize. In
# RandAugment's suite on the photographs: 1.0 at most (color), 0.37 for the translations (their
# shifts are fractions of a pixel there).
OPERATION_MEAN_ABS = {"contrast": 2.0, "color": 2.0}
OTHER_OPERATION_MEAN_ABS = 1.0


@pytest.fixture(scope="module")
def photos(real_photos, demo_imagenet) -> list[np.ndarray]:
    """Eight HWC uint8 images of SIZE x SIZE: sample photographs, or the demo set's images."""
    paths = [path for _, path in sorted(real_photos.items())[::125]] or sorted(demo_imagenet.rglob("*.JPEG"))[::9]
    return [np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for p in paths[:8]]


def dali_operations(images: list[np.ndarray], augment: AutoAugment, operations, bins, signs) -> list[np.ndarray]:
    """The images through DALI's operations (CPU), as the train pipeline applies them."""

    @pipeline_def(enable_conditionals=True, batch_size=len(images), num_threads=1, device_id=None)
    def graph():
        data, *draws = fn.external_source(
            source=lambda: (images, list(operations), list(bins), list(signs)),
            num_outputs=4,
            batch=True,
            layout=["HWC", "", "", ""],
        )
        return auto_augment_images(data, augment, SIZE, *draws)

    pipe = graph()
    pipe.build()
    (outputs,) = pipe.run()
    return [np.asarray(outputs[i]) for i in range(len(images))]


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("name", OPERATIONS)
def test_each_operation_matches_dalis(photos, name, suite):
    """torch-uint8's operations (torchvision's kernels) against DALI's suite, operation by operation,
    at the strongest magnitude and a middle one, with and without the sign."""
    augment = AutoAugment(suite, ops=1)
    count = len(photos)
    operations = np.full((count, 1), OPERATIONS.index(name), np.int32)
    bins = np.array([MAGNITUDE_BINS - 1, 15] * (count // 2), np.int32).reshape(count, 1)
    signs = np.array([0, 0, 1, 1] * (count // 4), np.int32).reshape(count, 1)
    dali = dali_operations(photos, augment, operations, bins, signs)
    tolerance = OPERATION_MEAN_ABS.get(name, OTHER_OPERATION_MEAN_ABS)
    differences, strongest_changes = [], []
    for i, (image, dali_out) in enumerate(zip(photos, dali, strict=True)):
        chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
        ours = augment.apply(chw, operations[i], bins[i], signs[i]).permute(1, 2, 0).numpy()
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        # inside a one-pixel border, which DALI's sharpness filters and PIL's (so torchvision's) keeps
        differences.append(np.abs(ours.astype(float) - dali_out.astype(float))[1:-1, 1:-1].mean())
        if bins[i, 0] == MAGNITUDE_BINS - 1:
            strongest_changes.append(np.abs(ours.astype(float) - image.astype(float)).mean())
    assert max(differences) <= tolerance, (name, differences)
    # The operation does something, far more than the backends differ by (on average over the
    # images: color leaves a grey photograph as it is, sharpness a blurred one nearly so).
    if name == "identity":
        assert max(strongest_changes) == 0
    else:
        assert np.mean(strongest_changes) > 2 * max(differences), (strongest_changes, differences)


def test_rand_augment_applies_its_operations_in_the_drawn_order(photos):
    """Three operations in a row (one per draw, each at bin 9 with its sign), DALI and torch-uint8
    alike; the order matters (a rotation after a translation is not the translation after it)."""
    augment = AutoAugment("rand_augment", ops=3, magnitude=9)
    count = len(photos)
    rotate, translate, solarize = (OPERATIONS.index(name) for name in ("rotate", "translate_x", "solarize"))
    operations = np.array([[rotate, translate, solarize], [translate, rotate, solarize]] * (count // 2), np.int32)
    bins = np.full((count, 3), 9, np.int32)
    signs = np.array([[0, 1, 0], [1, 0, 0]] * (count // 2), np.int32)  # rotate +9, translate -9 in both
    dali = dali_operations(photos, augment, operations, bins, signs)
    ours = []
    for i, image in enumerate(photos):
        chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
        ours.append(augment.apply(chw, operations[i], bins[i], signs[i]).permute(1, 2, 0).numpy().astype(float))
        assert np.abs(ours[i] - dali[i])[1:-1, 1:-1].mean() <= 2 * OTHER_OPERATION_MEAN_ABS
    # the other order on photograph 0
    swapped = augment.apply(
        torch.from_numpy(photos[0].copy()).permute(2, 0, 1), operations[1], bins[1], signs[1]
    ).permute(1, 2, 0)
    assert np.abs(swapped.numpy().astype(float) - ours[0]).mean() > 2 * OTHER_OPERATION_MEAN_ABS


def test_trivial_augment_draws_cover_every_operation_bin_and_sign():
    operations, bins, signs = AutoAugment("trivial_augment_wide").draw(20_000, np.random.default_rng(0))
    assert operations.shape == bins.shape == signs.shape == (20_000, 1)
    assert set(operations.ravel().tolist()) == set(range(len(OPERATIONS)))
    assert set(bins.ravel().tolist()) == set(range(MAGNITUDE_BINS))
    assert set(signs.ravel().tolist()) == {0, 1}
    counts = np.bincount(operations.ravel()) / operations.size
    assert np.all(np.abs(counts - 1 / len(OPERATIONS)) < 0.01)


def test_rand_augment_draws_ops_operations_per_image_at_its_magnitude():
    operations, bins, signs = AutoAugment("rand_augment", ops=3, magnitude=7).draw(20_000, np.random.default_rng(0))
    assert operations.shape == bins.shape == signs.shape == (20_000, 3)
    assert set(bins.ravel().tolist()) == {7}
    assert set(signs.ravel().tolist()) == {0, 1}
    for k in range(3):  # each position drawn uniformly, independently of the others (with replacement)
        counts = np.bincount(operations[:, k], minlength=len(OPERATIONS)) / len(operations)
        assert np.all(np.abs(counts - 1 / len(OPERATIONS)) < 0.01)
    same = (operations[:, 0] == operations[:, 1]).mean()
    assert abs(same - 1 / len(OPERATIONS)) < 0.01


@pytest.mark.parametrize("suite", SUITES)
def test_dali_cpu_and_torch_uint8_apply_the_same_operations(raw_and_jpeg_shards, suite):
    """Same crops, flips and operations on both: the images agree within a few grey levels (the two
    resizes differ at the crop's edge and the geometric operations move that edge inward), and they
    differ from the same batches without the auto-augmentation."""
    raw, _ = raw_and_jpeg_shards
    augmented = [
        collect(create_loader(str(raw), "train", config(b, auto_augment=suite)), epoch=1)
        for b in ("dali-cpu", "torch-uint8")
    ]
    plain = collect(create_loader(str(raw), "train", config("dali-cpu")), epoch=1)
    assert len(augmented[0]) == len(augmented[1]) == len(plain) > 0
    changed = 0
    for (dali, dali_labels), (uint8, uint8_labels), (plain_images, plain_labels) in zip(*augmented, plain, strict=True):
        assert torch.equal(dali_labels, uint8_labels) and torch.equal(dali_labels, plain_labels)
        per_image = (dali - uint8).abs().mean(dim=(1, 2, 3))
        assert per_image.max() <= 0.08, per_image  # 0.08 of the normalized range: about 5 grey levels
        changed += int(((dali - plain_images).abs().mean(dim=(1, 2, 3)) > 0.02).sum())
    images = sum(len(labels) for _, labels in plain)
    assert changed >= images // 2, (changed, images)  # 1 in 14 is identity; weak draws change little


@pytest.mark.parametrize("suite", SUITES)
def test_torch_backend_applies_torchvisions_own(photo_shards, suite):
    """The `torch` backend: torchvision's TrivialAugmentWide or RandAugment on PIL images (their own
    draws, from the workers' generators, so no per-image comparison): the batches keep the contract."""
    from tests.test_loaders import HIGHEST, LOWEST

    with_it = collect(create_loader(str(photo_shards), "train", config("torch", auto_augment=suite)))
    without = collect(create_loader(str(photo_shards), "train", config("torch")))
    for (images, labels), (plain, plain_labels) in zip(with_it, without, strict=True):
        assert torch.equal(labels, plain_labels)  # same order: only the pixels change
        assert images.shape == plain.shape
        assert LOWEST - 0.01 <= images.min() and images.max() <= HIGHEST + 0.01


def test_an_unknown_auto_augment_or_a_bad_rand_augment_setting_is_named():
    with pytest.raises(ValueError, match=r"data.auto_augment: 'randaugment' is not one of \['none', 'trivial_aug"):
        config("dali-cpu", auto_augment="randaugment").check()
    with pytest.raises(ValueError, match=r"data.rand_augment_ops must be at least 1, got 0"):
        config("dali-cpu", auto_augment="rand_augment", rand_augment_ops=0).check()
    with pytest.raises(ValueError, match=r"data.rand_augment_magnitude must be a bin from 0 to 30, got -1"):
        config("dali-cpu", auto_augment="rand_augment", rand_augment_magnitude=-1).check()
