"""TrivialAugment Wide, RandAugment (torchvision's and timm's) and AutoAugment's ImageNet policy:
torchvision's kernels against DALI's suites and against timm's own operations, and the loaders that
apply them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP
from torchvision import transforms

from pipeline.auto_augment import (
    FILL,
    MAGNITUDE_BINS,
    MAGNITUDES,
    OPERATIONS,
    POLICY_OPERATIONS,
    TIMM_LEVEL_STEPS,
    TIMM_MAGNITUDE_BINS,
    TIMM_OPERATIONS,
    TORCHVISION_NAMES,
    AutoAugment,
    imagenet_policy,
)
from pipeline.dali_pipeline import auto_augment_images
from pipeline.loader import create_loader
from tests.test_loaders import collect, config

SIZE = 96
SUITES = ("trivial_augment_wide", "rand_augment", "auto_augment_imagenet", "rand_augment_timm")
# Mean absolute difference (grey levels of 255) allowed between DALI's operation and torch-uint8's
# on one image, inside a one-pixel border. Measured on the sample photographs and on the demo images
# at 96 px, bins 15 and 30 of TrivialAugment's suite: 1.25 at most for color, 1.0 for contrast
# (torchvision rounds the grey mean it blends with; 1.5 at bin 1), 0.75 or less for the others
# (interpolation, rounding), and 0 for the translations, posterize, solarize and equalize. In
# RandAugment's suite on the photographs: 1.0 at most (color), 0.37 for the translations (their
# shifts are fractions of a pixel there). In AutoAugment's, every bin on the photographs: 1.4 at most
# (contrast), 1.0 for color, 0.53 or less for the others, 0 for invert. In timm's RandAugment's, at
# magnitudes 5 and 10: 1.0 for color, 0.95 for contrast, 0.53 or less for the others, 0 for equalize,
# invert, posterize, solarize and solarize-add.
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
def test_each_operation_matches_dalis(photos, suite):
    """torch-uint8's operations (torchvision's kernels) against DALI's suite, operation by operation,
    at the strongest magnitude and a middle one, with and without the sign (AutoAugment's second
    operation is identity): every operation on every photograph, in one DALI batch."""
    augment = AutoAugment(suite, ops=1)
    strongest, per_image = augment.magnitude_bins - 1, augment.operations_per_image
    variants = [(strongest, 0), (augment.magnitude_bins // 2, 0), (strongest, 1), (augment.magnitude_bins // 2, 1)]
    cases = [(name, photo, *variants[k % 4]) for name in augment.operations for k, photo in enumerate(photos)]
    operations = np.full((len(cases), per_image), augment.operations.index("identity"), np.int32)
    bins, signs = np.zeros_like(operations), np.zeros_like(operations)
    for i, (name, _, magnitude_bin, sign) in enumerate(cases):
        operations[i, 0], bins[i, 0], signs[i, 0] = augment.operations.index(name), magnitude_bin, sign
    dali = dali_operations([photo for _, photo, _, _ in cases], augment, operations, bins, signs)
    for name in augment.operations:
        differences, strongest_changes = [], []
        for i, (case_name, image, magnitude_bin, _) in enumerate(cases):
            if case_name != name:
                continue
            chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
            ours = augment.apply(chw, operations[i], bins[i], signs[i]).permute(1, 2, 0).numpy()
            assert ours.dtype == np.uint8 and ours.shape == image.shape
            # inside a one-pixel border, which DALI's sharpness filters and PIL's (so torchvision's) keeps
            differences.append(np.abs(ours.astype(float) - dali[i].astype(float))[1:-1, 1:-1].mean())
            if magnitude_bin == strongest:
                strongest_changes.append(np.abs(ours.astype(float) - image.astype(float)).mean())
        assert max(differences) <= OPERATION_MEAN_ABS.get(name, OTHER_OPERATION_MEAN_ABS), (name, differences)
        # The operation does something, far more than the backends differ by (on average over the
        # images: color leaves a grey photograph as it is, sharpness a blurred one nearly so).
        if name == "identity":
            assert max(strongest_changes) == 0
        else:
            assert np.mean(strongest_changes) > 2 * max(differences), (name, strongest_changes, differences)


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


def test_auto_augment_draws_follow_torchvisions_imagenet_policy():
    """Per image: one of the 25 sub-policies, each of its two operations kept with its probability
    (else identity), at its bin."""
    policy_operations, chances, policy_bins = imagenet_policy()
    assert policy_operations.shape == chances.shape == policy_bins.shape == (25, 2)
    operations, bins, signs = AutoAugment("auto_augment_imagenet").draw(40_000, np.random.default_rng(0))
    assert operations.shape == bins.shape == signs.shape == (40_000, 2)
    identity = POLICY_OPERATIONS.index("identity")
    for k in range(2):
        kept = operations[:, k] != identity
        assert abs(kept.mean() - chances[:, k].mean()) < 0.01  # sub-policies drawn uniformly
        drawn = set(zip(operations[kept, k].tolist(), bins[kept, k].tolist(), strict=True))
        steps = zip(policy_operations[:, k].tolist(), policy_bins[:, k].tolist(), chances[:, k], strict=True)
        assert drawn == {(operation, b) for operation, b, chance in steps if chance > 0}
        assert set(bins[~kept, k].tolist()) == {0}
    # both kept, in order: e.g. torchvision's first sub-policy, posterize at bin 8 then rotate at bin 9
    first = (operations[:, 0] == policy_operations[0, 0]) & (bins[:, 0] == policy_bins[0, 0])
    assert set(zip(operations[first, 1].tolist(), bins[first, 1].tolist(), strict=True)) >= {
        (int(policy_operations[0, 1]), int(policy_bins[0, 1]))
    }


def test_auto_augment_magnitudes_are_torchvisions():
    """Each policy operation's 10 magnitudes as torchvision's AutoAugment gives them (its table is
    private, so read here only to check ours)."""
    augment = AutoAugment("auto_augment_imagenet")
    ranged = MAGNITUDES["auto_augment_imagenet"]
    names = {ours: theirs for theirs, ours in TORCHVISION_NAMES.items() if ours in ranged}
    assert set(names) == set(ranged)
    space = transforms.AutoAugment()._augmentation_space(augment.magnitude_bins, (SIZE, SIZE))
    for name, torchvision_name in names.items():
        theirs, signed = space[torchvision_name]
        ours = [augment.magnitude_of(name, b, 0, SIZE) for b in range(augment.magnitude_bins)]
        if name == "posterize":
            ours = [round(m) for m in ours]  # bits kept, as apply_operation rounds them
        np.testing.assert_allclose(ours, theirs.double().numpy(), atol=1e-5, err_msg=name)
        assert (augment.magnitude_of(name, 3, 1, SIZE) == -ours[3]) == signed, name


# timm's names of timm's RandAugment's operations (the "increasing" variants)
TIMM_NAMES = {
    "auto_contrast": "AutoContrast", "equalize": "Equalize", "invert": "Invert", "rotate": "Rotate",
    "posterize": "PosterizeIncreasing", "solarize": "SolarizeIncreasing", "solarize_add": "SolarizeAdd",
    "color": "ColorIncreasing", "contrast": "ContrastIncreasing", "brightness": "BrightnessIncreasing",
    "sharpness": "SharpnessIncreasing", "shear_x": "ShearX", "shear_y": "ShearY", "translate_x": "TranslateXRel",
    "translate_y": "TranslateYRel",
}  # fmt: skip
# Mean absolute difference (grey levels) from timm's PIL operations, measured on 20 sample photographs
# at 96 px, magnitudes 5 and 9, both signs: rotate 1.2, the translations and shears 0.8, color 1.0,
# contrast 0.93, auto_contrast 0.48, the rest 0. Equalize follows OpenCV's formula (DALI's), not
# PIL's, as in the other suites: up to 32 on a photograph, so it is not compared.
TIMM_MEAN_ABS = {"rotate": 2.0, "color": 2.0, "contrast": 2.0}


def test_timm_rand_augment_parameters_are_timms():
    """At every bin, the parameter of each operation is the one timm's `LEVEL_TO_ARG` gives that
    magnitude (up to its random sign: degrees, shear, translation as a share of the side,
    enhancement factor, bits kept, solarize threshold and shift)."""
    augment = AutoAugment("rand_augment_timm")
    assert set(TIMM_NAMES) | {"identity"} == set(TIMM_OPERATIONS)
    for name, timm_name in TIMM_NAMES.items():
        for magnitude_bin in range(TIMM_MAGNITUDE_BINS):
            level_to_arg = LEVEL_TO_ARG[timm_name]
            ours = augment.magnitude_of(name, magnitude_bin, 0, SIZE)
            if level_to_arg is None:
                assert ours == 0.0
                continue
            (theirs,) = level_to_arg(magnitude_bin / TIMM_LEVEL_STEPS, {"translate_pct": 0.45})
            if name in ("color", "contrast", "brightness", "sharpness"):
                theirs = theirs - 1.0  # a factor around 1
            if name in ("translate_x", "translate_y"):
                theirs = theirs * SIZE  # a share of the side
            assert ours == pytest.approx(abs(theirs), abs=1e-9), (name, magnitude_bin, ours, theirs)
            if name not in ("posterize", "solarize", "solarize_add"):
                assert augment.magnitude_of(name, magnitude_bin, 1, SIZE) == -ours


def timm_arguments(name: str, magnitude: float) -> tuple:
    """timm's operation arguments for our signed magnitude. timm's shears and translations map the
    output to the input (PIL's affine), DALI's the input to the output: the sign flips."""
    if name in ("color", "contrast", "brightness", "sharpness"):
        return (1.0 + magnitude,)
    if name in ("shear_x", "shear_y"):
        return (-magnitude,)
    if name in ("translate_x", "translate_y"):
        return (-magnitude / SIZE,)
    if name in ("posterize", "solarize", "solarize_add"):
        return (int(magnitude),)
    return () if name in ("auto_contrast", "equalize", "invert") else (magnitude,)


@pytest.mark.parametrize("name", [name for name in TIMM_NAMES if name != "equalize"])
def test_timm_rand_augment_operations_follow_timms(photos, name):
    """torch-uint8's operations (and so DALI's, tested above) against timm's own PIL operations,
    filled with gray and interpolated bilinearly, at magnitudes 5 and 9 with either sign."""
    augment = AutoAugment("rand_augment_timm")
    operation = TIMM_OPERATIONS.index(name)
    differences = []
    for magnitude_bin, negate in itertools.product((5 * TIMM_LEVEL_STEPS, 9 * TIMM_LEVEL_STEPS), (0, 1)):
        magnitude = augment.magnitude_of(name, magnitude_bin, negate, SIZE)
        for image in photos:
            chw = torch.from_numpy(image.copy()).permute(2, 0, 1)
            ours = augment.apply(chw, [operation], [magnitude_bin], [negate]).permute(1, 2, 0).numpy()
            theirs = NAME_TO_OP[TIMM_NAMES[name]](
                Image.fromarray(image), *timm_arguments(name, magnitude), fillcolor=(FILL,) * 3, resample=Image.BILINEAR
            )
            differences.append(np.abs(ours.astype(float) - np.asarray(theirs, dtype=float))[1:-1, 1:-1].mean())
    assert max(differences) <= TIMM_MEAN_ABS.get(name, OTHER_OPERATION_MEAN_ABS), differences


def test_timm_rand_augments_strongest_posterize_keeps_no_bit(photos):
    """At magnitude 10 timm's posterize keeps 0 bits: black, as timm gives it with the Pillow of its
    time. (Pillow 13, installed here, refuses 0 bits, so timm itself raises there.)"""
    augment = AutoAugment("rand_augment_timm")
    chw = torch.from_numpy(photos[0].copy()).permute(2, 0, 1)
    strongest = augment.apply(chw, [TIMM_OPERATIONS.index("posterize")], [TIMM_MAGNITUDE_BINS - 1], [0])
    assert augment.magnitude_of("posterize", TIMM_MAGNITUDE_BINS - 1, 0, SIZE) == 0
    assert strongest.max() == 0


def test_timm_rand_augment_draws_follow_timms():
    """Per image `ops` operations drawn uniformly with replacement, each applied with probability
    0.5 (else identity), at a magnitude drawn around `magnitude` with `magnitude_std`, clipped to
    0-10, to 0.1; a sign each."""
    augment = AutoAugment("rand_augment_timm", ops=3, magnitude=9, magnitude_std=0.5)
    operations, bins, signs = augment.draw(40_000, np.random.default_rng(0))
    assert operations.shape == bins.shape == signs.shape == (40_000, 3)
    applied = operations != TIMM_OPERATIONS.index("identity")
    assert abs(applied.mean() - 0.5) < 0.01
    counts = np.bincount(operations[applied], minlength=len(TIMM_OPERATIONS))[:-1] / applied.sum()
    assert np.all(np.abs(counts - 1 / len(TIMM_NAMES)) < 0.01)
    levels = bins[applied] / TIMM_LEVEL_STEPS
    clipped = np.clip(np.random.default_rng(1).normal(9, 0.5, 1_000_000), 0, 10)
    assert abs(levels.mean() - clipped.mean()) < 0.01 and abs(levels.std() - clipped.std()) < 0.01
    assert levels.max() == 10 and abs((levels == 10).mean() - (clipped >= 9.95).mean()) < 0.005
    assert set(bins[~applied].tolist()) == {0} and set(signs.ravel().tolist()) == {0, 1}
    fixed = AutoAugment("rand_augment_timm", magnitude=6, magnitude_std=0.0).draw(1000, np.random.default_rng(0))
    assert set(fixed[1][fixed[0] != TIMM_OPERATIONS.index("identity")].tolist()) == {6 * TIMM_LEVEL_STEPS}


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
    """The `torch` backend: torchvision's TrivialAugmentWide, RandAugment or AutoAugment on PIL
    images, or for timm's RandAugment torch-uint8's operations (`DrawnAugment`); their own draws,
    from the workers' generators, so no per-image comparison: the batches keep the contract."""
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
    with pytest.raises(ValueError, match=r"rand_augment_magnitude must be from 0 to 10 for rand_augment_timm .*got 11"):
        config("dali-cpu", auto_augment="rand_augment_timm", rand_augment_magnitude=11).check()
    with pytest.raises(ValueError, match=r"data.rand_augment_magnitude_std must be from 0 to 10, got -0.5"):
        config("dali-cpu", auto_augment="rand_augment_timm", rand_augment_magnitude_std=-0.5).check()
