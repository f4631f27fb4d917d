"""TrivialAugment Wide: torchvision's kernels against DALI's suite, and the loaders that apply it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image

from pipeline.auto_augment import MAGNITUDE_BINS, OPERATIONS, apply_operation, draw_operations
from pipeline.dali_pipeline import trivial_augment
from pipeline.loader import create_loader
from tests.test_loaders import collect, config

SIZE = 96
# Mean absolute difference (grey levels of 255) allowed between DALI's operation and torch-uint8's
# on one image, inside a one-pixel border. Measured on the sample photographs and on the demo images
# at 96 px, bins 15 and 30: 1.25 at most for color, 1.0 for contrast (torchvision rounds the grey
# mean it blends with; 1.5 at bin 1), 0.75 or less for the others (interpolation, rounding), and 0
# for the translations, posterize, solarize and equalize.
OPERATION_MEAN_ABS = {"contrast": 2.0, "color": 2.0}
OTHER_OPERATION_MEAN_ABS = 1.0


@pytest.fixture(scope="module")
def photos(real_photos, demo_imagenet) -> list[np.ndarray]:
    """Eight HWC uint8 images of SIZE x SIZE: sample photographs, or the demo set's images."""
    paths = [path for _, path in sorted(real_photos.items())[::125]] or sorted(demo_imagenet.rglob("*.JPEG"))[::9]
    return [np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) for p in paths[:8]]


def dali_operations(images: list[np.ndarray], operations, bins, signs) -> list[np.ndarray]:
    """The images through DALI's operations (CPU), as the train pipeline applies them."""

    @pipeline_def(enable_conditionals=True, batch_size=len(images), num_threads=1, device_id=None)
    def graph():
        data, *draws = fn.external_source(
            source=lambda: (images, list(operations), list(bins), list(signs)),
            num_outputs=4,
            batch=True,
            layout=["HWC", "", "", ""],
        )
        return trivial_augment(data, *draws)

    pipe = graph()
    pipe.build()
    (outputs,) = pipe.run()
    return [np.asarray(outputs[i]) for i in range(len(images))]


@pytest.mark.parametrize("name", OPERATIONS)
def test_each_operation_matches_dalis(photos, name):
    """`apply_operation` (torchvision's kernels, for torch-uint8) against DALI's suite, operation by
    operation, at the strongest magnitude and a middle one, with and without the sign."""
    count = len(photos)
    operations = np.full(count, OPERATIONS.index(name), np.int32)
    bins = np.array([MAGNITUDE_BINS - 1, 15] * (count // 2), np.int32)
    signs = np.array([0, 0, 1, 1] * (count // 4), np.int32)
    dali = dali_operations(photos, operations, bins, signs)
    tolerance = OPERATION_MEAN_ABS.get(name, OTHER_OPERATION_MEAN_ABS)
    differences, strongest_changes = [], []
    for image, dali_out, b, s in zip(photos, dali, bins, signs, strict=True):
        chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
        ours = apply_operation(chw, OPERATIONS.index(name), int(b), int(s)).permute(1, 2, 0).numpy()
        assert ours.dtype == np.uint8 and ours.shape == image.shape
        # inside a one-pixel border, which DALI's sharpness filters and PIL's (so torchvision's) keeps
        differences.append(np.abs(ours.astype(float) - dali_out.astype(float))[1:-1, 1:-1].mean())
        if b == MAGNITUDE_BINS - 1:
            strongest_changes.append(np.abs(ours.astype(float) - image.astype(float)).mean())
    assert max(differences) <= tolerance, (name, differences)
    # The operation does something, far more than the backends differ by (on average over the
    # images: color leaves a grey photograph as it is, sharpness a blurred one nearly so).
    if name == "identity":
        assert max(strongest_changes) == 0
    else:
        assert np.mean(strongest_changes) > 2 * max(differences), (strongest_changes, differences)


def test_draws_cover_every_operation_bin_and_sign():
    operations, bins, signs = draw_operations(20_000, np.random.default_rng(0))
    assert set(operations.tolist()) == set(range(len(OPERATIONS)))
    assert set(bins.tolist()) == set(range(MAGNITUDE_BINS))
    assert set(signs.tolist()) == {0, 1}
    counts = np.bincount(operations) / len(operations)
    assert np.all(np.abs(counts - 1 / len(OPERATIONS)) < 0.01)


def test_dali_cpu_and_torch_uint8_apply_the_same_operations(raw_and_jpeg_shards):
    """Same crops, flips and operations on both: the images agree within a few grey levels (the two
    resizes differ at the crop's edge and the geometric operations move that edge inward), and they
    differ from the same batches without TrivialAugment."""
    raw, _ = raw_and_jpeg_shards
    augmented = [
        collect(create_loader(str(raw), "train", config(b, auto_augment="trivial_augment_wide")), epoch=1)
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


def test_torch_backend_applies_torchvisions_trivial_augment(photo_shards):
    """The `torch` backend: torchvision's TrivialAugmentWide on PIL images (its own draws, from the
    workers' generators, so no per-image comparison): the batches keep the contract."""
    from tests.test_loaders import HIGHEST, LOWEST

    with_it = collect(create_loader(str(photo_shards), "train", config("torch", auto_augment="trivial_augment_wide")))
    without = collect(create_loader(str(photo_shards), "train", config("torch")))
    for (images, labels), (plain, plain_labels) in zip(with_it, without, strict=True):
        assert torch.equal(labels, plain_labels)  # same order: only the pixels change
        assert images.shape == plain.shape
        assert LOWEST - 0.01 <= images.min() and images.max() <= HIGHEST + 0.01


def test_an_unknown_auto_augment_is_named():
    with pytest.raises(ValueError, match=r"data.auto_augment: 'randaugment' is not one of \['none', 'trivial_aug"):
        config("dali-cpu", auto_augment="randaugment").check()
