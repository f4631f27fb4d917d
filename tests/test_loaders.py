"""Every backend on real shards: the batch contract, labels, backend agreement, bad input."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.errors import SampleDecodeError
from pipeline.loader import PAD_LABEL, LoaderConfig, create_loader
from pipeline.shard_set import ShardError, open_shard_set
from pipeline.split import EarlierSplit
from pipeline.transforms import IMAGENET_MEAN, IMAGENET_STD
from shards.manifest import read_manifest
from shards.tar_writer import ShardWriter, encode_sample

CPU_BACKENDS = ["dali-cpu", "torch", "torch-uint8"]
# Normalized values lie in [(0 - mean) / std, (1 - mean) / std] per channel.
LOWEST = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
HIGHEST = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
# DALI (CPU) and torchvision agree on val images to within about one grey level out of 255: they
# decode identically (libjpeg-turbo); the residue is rounding in the resize. 0.05 is ~3 grey levels.
VAL_AGREEMENT_MAX_ABS = 0.05
VAL_AGREEMENT_MEAN_ABS = 0.01
# With bicubic resizes (data.interpolation) they agree as closely on average (0.003), but 1.7 pixels
# in 10,000 of the sample photographs differ by more than VAL_AGREEMENT_MAX_ABS, by up to 0.24 (14
# grey levels): mostly next to black or white, where the cubic filter overshoots the range and the
# two clip it differently.
BICUBIC_OUTLIERS = 0.001  # share of pixels allowed beyond VAL_AGREEMENT_MAX_ABS
BICUBIC_MAX_ABS = 0.3
TRAIN_EDGE = 2  # rows and columns at a train crop's edge where DALI's and torchvision's resize differ most


def config(backend: str, **overrides) -> LoaderConfig:
    settings = dict(backend=backend, batch_size=8, workers=2, image_size=64, val_image_size=64, dtype="float32")
    settings.update(overrides)
    return LoaderConfig(**settings)


def collect(loader, epoch: int = 0):
    loader.set_epoch(epoch)
    batches = list(loader)
    loader.close()
    return batches


def stored_samples(shards: Path, split: str) -> list[dict]:
    """The split's samples as the webdataset library reads them, in manifest order."""
    urls = [str(shards / s.file) for s in read_manifest(shards).splits[split].shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def manifest_labels_in_order(shards: Path, split: str) -> list[int]:
    return [int(s["cls"]) for s in stored_samples(shards, split)]


def labels_by_key(shards: Path, split: str) -> dict[str, int]:
    return {s["__key__"]: int(s["cls"]) for s in stored_samples(shards, split)}


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["synthetic"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_batch_contract(photo_shards, backend, dtype):
    loader = create_loader(str(photo_shards), "train", config(backend, dtype=dtype))
    batches = collect(loader)
    assert len(batches) == loader.steps_per_epoch > 0
    for images, labels in batches:
        assert images.shape == (8, 3, 64, 64)
        assert images.dtype == getattr(torch, dtype)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        assert 0 <= labels.min() and labels.max() < len(read_manifest(photo_shards).classes)
        if backend != "synthetic":
            assert LOWEST - 0.01 <= images.float().min() and images.float().max() <= HIGHEST + 0.01


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_train_labels_are_the_manifests(photo_shards, backend):
    """Over one epoch on one rank, the labels read are the stored labels less fewer than a batch."""
    stored = sorted(manifest_labels_in_order(photo_shards, "train"))
    read = sorted(
        label
        for _, labels in collect(create_loader(str(photo_shards), "train", config(backend)))
        for label in labels.tolist()
    )
    assert len(stored) - 8 < len(read) <= len(stored)
    assert not Counter(read) - Counter(stored)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_val_labels_in_order_with_padding_marked(photo_shards, backend, world_size):
    stored = manifest_labels_in_order(photo_shards, "val")
    seen = []
    for rank in range(world_size):
        loader = create_loader(str(photo_shards), "val", config(backend), rank, world_size)
        labels = torch.cat([labels for _, labels in collect(loader)]).tolist()
        real = [label for label in labels if label != PAD_LABEL]
        assert labels[: len(real)] == real, "padding only at the end"
        seen += real
    assert seen == stored, "every val sample exactly once, in order"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("split", "world_size"), [("train", 2), ("val", 3)])
def test_sample_keys_name_each_batchs_samples_in_order(photo_shards, backend, split, world_size):
    """What keeps labels from outside the shards (ImageNet-ReaL's) with their images: batch s holds
    the samples of sample_keys()[s * B:(s + 1) * B], for every backend, in a shuffled train epoch and
    on ranks with val padding."""
    label_of = labels_by_key(photo_shards, split)
    for rank in range(world_size):
        loader = create_loader(str(photo_shards), split, config(backend), rank, world_size)
        loader.set_epoch(1)
        keys = loader.sample_keys()
        labels = torch.cat([labels for _, labels in collect(loader, epoch=1)]).tolist()
        assert len(keys) == len(labels) == loader.steps_per_epoch * 8
        stored = [label_of[key] for key in keys]
        assert labels == [PAD_LABEL if read == PAD_LABEL else label for read, label in zip(labels, stored, strict=True)]
        assert len(set(keys)) > len(keys) // 2  # not one sample's key over and over


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_augmentation_gives_a_group_of_ranks_the_same_samples_cropped_apart(photo_shards, backend):
    """data.aug_repeats=2 on two ranks: both read the same samples in the same order (the split's
    promise, in each backend's reading order), as many steps as without, each rank its own crops."""
    plain = create_loader(str(photo_shards), "train", config(backend), 0, 2)
    loaders = [create_loader(str(photo_shards), "train", config(backend, aug_repeats=2), r, 2) for r in (0, 1)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == plain.steps_per_epoch > 0
    plain.close()
    epoch = [collect(loader, epoch=1) for loader in loaders]
    for (images_0, labels_0), (images_1, labels_1) in zip(*epoch, strict=True):
        assert torch.equal(labels_0, labels_1)
        assert (images_0 - images_1).abs().mean(dim=(1, 2, 3)).min() > 0.05, "each copy cropped its own way"
    labels = Counter(label for _, labels in epoch[0] for label in labels.tolist())
    assert len(labels) > 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_augmentation_on_one_rank_puts_the_copies_side_by_side(photo_shards, backend):
    """data.aug_repeats=2 on one rank: each sample twice, the copies next to each other in a batch
    (as torchvision's RASampler leaves them), each cropped its own way."""
    loader = create_loader(str(photo_shards), "train", config(backend, aug_repeats=2))
    batches = collect(loader, epoch=1)
    assert batches
    for images, labels in batches:
        assert torch.equal(labels[0::2], labels[1::2])
        assert (images[0::2] - images[1::2]).abs().mean(dim=(1, 2, 3)).min() > 0.05, "each copy cropped its own way"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("backend", ["torch", "torch-uint8"])
def test_backends_agree_with_dali_cpu_on_val_images(photo_shards, backend, interpolation):
    outputs = {}
    for name in ("dali-cpu", backend):
        loader = create_loader(str(photo_shards), "val", config(name, val_image_size=224, interpolation=interpolation))
        outputs[name] = collect(loader)
    for (dali_images, dali_labels), (other_images, other_labels) in zip(*outputs.values(), strict=True):
        assert torch.equal(dali_labels, other_labels)
        assert_resizes_agree((dali_images - other_images).abs(), interpolation)


def assert_resizes_agree(difference: torch.Tensor, interpolation: str, inside: slice = slice(None)) -> None:
    """The absolute difference of two backends' images is within the tolerance of their resizes,
    its largest values only `inside` each image's rows and columns."""
    largest = difference[..., inside, inside]
    if interpolation == "bicubic":
        assert largest.max() <= BICUBIC_MAX_ABS
        assert (largest > VAL_AGREEMENT_MAX_ABS).double().mean() <= BICUBIC_OUTLIERS
    else:
        assert largest.max() <= VAL_AGREEMENT_MAX_ABS
    assert difference.mean() <= VAL_AGREEMENT_MEAN_ABS


@pytest.mark.parametrize(("shards", "interpolation"), [("raw", "bilinear"), ("jpeg", "bilinear"), ("jpeg", "bicubic")])
def test_torch_uint8_train_batches_are_dali_cpus(raw_and_jpeg_shards, shards, interpolation):
    """torch-uint8 reads, crops and flips exactly as the DALI backends do (same order, windows and
    flips from the same seeds); only the resize differs: within one grey level inside, while on the
    two outermost rows and columns the two resize filters treat the crop's edge differently (up to
    about 0.3, 17 grey levels, on the sample photographs; 0.01 or less on average over the batch)."""
    data = raw_and_jpeg_shards[0 if shards == "raw" else 1]
    batches = [
        collect(create_loader(str(data), "train", config(b, interpolation=interpolation)), epoch=2)
        for b in ("dali-cpu", "torch-uint8")
    ]
    assert_train_batches_agree(*batches, interpolation)


def test_torch_uint8_refills_its_batch_buffers_in_turn(raw_and_jpeg_shards):
    """One worker and a prefetch of one leave torch-uint8 three batch buffers in shared memory; at
    batch 2 an epoch takes 8 steps or more (16 or more photographs), so each buffer is refilled again
    and again (and across the epoch switch) while others are being read: every batch is still dali-cpu's."""
    raw, _ = raw_and_jpeg_shards
    loaders = [
        create_loader(str(raw), "train", config(b, batch_size=2, workers=1, prefetch=1))
        for b in ("dali-cpu", "torch-uint8")
    ]
    try:
        for epoch in (0, 1):  # one loader throughout: its workers and buffers persist across the switch
            for loader in loaders:
                loader.set_epoch(epoch)
            batches = [list(loader) for loader in loaders]
            assert len(batches[0]) == loaders[1].steps_per_epoch >= 8
            assert_train_batches_agree(*batches)
    finally:  # a failure must not leave the worker running into later tests
        for loader in loaders:
            loader.close()


def test_torch_uint8_starts_afresh_whenever_a_pass_is_not_the_one_its_workers_went_on_to(raw_and_jpeg_shards):
    """Its workers go on into the next epoch at the same size; a pass left unfinished, an epoch
    skipped or a new image size must not be served from those batches made ahead."""
    raw, _ = raw_and_jpeg_shards
    loader = create_loader(str(raw), "train", config("torch-uint8", batch_size=2, workers=1, prefetch=1))

    def dali_cpus(epoch: int, size: int = 64) -> list:
        dali = create_loader(str(raw), "train", config("dali-cpu", batch_size=2, image_size=size))
        dali.set_epoch(epoch)
        try:
            return list(dali)
        finally:
            dali.close()

    try:
        loader.set_epoch(0)
        for _ in loader:  # left after one batch: the workers are a prefetch ahead, in this epoch
            break
        loader.set_epoch(0)
        batches = iter(loader)  # read as the trainer reads: its steps' batches and not one more
        assert_train_batches_agree(dali_cpus(0), [next(batches) for _ in range(loader.steps_per_epoch)])
        assert loader._streamed_next == (1, 64, 0, loader.steps_per_epoch), "the workers go on into epoch 1"
        for epoch, size in [(0, 64), (1, 64), (3, 64), (4, 48), (5, 48)]:
            loader.set_epoch(epoch)
            loader.set_image_size(size)
            assert_train_batches_agree(dali_cpus(epoch, size), list(loader))
    finally:
        loader.close()


def test_torch_uint8_val_workers_go_on_into_the_same_pass_again(photo_shards):
    """Val batches are the same in every epoch: after a pass the workers start the next one at once,
    and every epoch's pass equals the first."""
    loader = create_loader(str(photo_shards), "val", config("torch-uint8", batch_size=2, workers=1, prefetch=1))
    try:
        first = list(loader)
        assert loader._streamed_next == (0, 64, 0, loader.steps_per_epoch), "the workers go on into the next pass"
        for epoch in (1, 2):
            loader.set_epoch(epoch)
            again = list(loader)
            assert len(again) == len(first) == loader.steps_per_epoch
            for (images, labels), (first_images, first_labels) in zip(again, first, strict=True):
                assert torch.equal(images, first_images) and torch.equal(labels, first_labels)
    finally:
        loader.close()


def assert_train_batches_agree(dali_batches: list, uint8_batches: list, interpolation: str = "bilinear") -> None:
    """dali-cpu's and torch-uint8's train batches: same labels, same pixels up to the two resizes."""
    assert len(dali_batches) == len(uint8_batches) > 0
    for (dali_images, dali_labels), (uint8_images, uint8_labels) in zip(dali_batches, uint8_batches, strict=True):
        assert torch.equal(dali_labels, uint8_labels)
        difference = (dali_images - uint8_images).abs()
        assert_resizes_agree(difference, interpolation, inside=slice(TRAIN_EDGE, -TRAIN_EDGE))


def test_exif_rotated_photo_is_read_as_stored_by_every_backend(tmp_path):
    """EXIF orientation is ignored everywhere, as torchvision does; DALI alone would rotate the photo."""
    import numpy as np
    from PIL import Image

    from tests.conftest import run_tool

    height, width = 120, 200
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    photo = Image.fromarray(ramp.astype(np.uint8))  # left dark, right bright: a rotation shows at once
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (tmp_path / split / wnid).mkdir(parents=True)
            photo.save(tmp_path / split / wnid / f"{wnid}_1.JPEG", quality=95, exif=exif)
    run_tool(
        "tools.make_shards", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
        "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress", check=True,
    )  # fmt: skip
    outputs = {}
    for backend in CPU_BACKENDS:
        loader = create_loader(str(tmp_path / "shards"), "val", config(backend, batch_size=2, val_image_size=96))
        outputs[backend] = collect(loader)[0][0]
    for images in outputs.values():
        assert images[:, :, 48, 80].mean() > images[:, :, 48, 16].mean() + 1, "right side brighter: not rotated"
    for backend in CPU_BACKENDS[1:]:
        assert (outputs["dali-cpu"] - outputs[backend]).abs().max() <= VAL_AGREEMENT_MAX_ABS, backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_image_size_changes_between_epochs(photo_shards, backend):
    loader = create_loader(str(photo_shards), "train", config(backend))
    loader.set_epoch(0)
    assert next(iter(loader))[0].shape[-1] == 64
    loader.set_image_size(32)
    loader.set_epoch(1)
    assert next(iter(loader))[0].shape[-1] == 32
    loader.set_image_size(96)  # larger than the first: torch-uint8 needs larger batch buffers
    loader.set_epoch(2)
    assert next(iter(loader))[0].shape[-1] == 96
    loader.close()


def test_train_batches_do_not_depend_on_where_the_pipeline_started(photo_shards):
    """Crops, flips and order of an epoch are the same whether its pipeline began there or epochs before:
    resuming at any epoch repeats the batches of a run that never stopped."""
    straight = create_loader(str(photo_shards), "train", config("dali-cpu"))
    for epoch in (0, 1):  # on one pipeline
        straight.set_epoch(epoch)
        second_epoch = list(straight)
    straight.close()
    assert straight.pipelines_built == 1
    resumed = collect(create_loader(str(photo_shards), "train", config("dali-cpu")), epoch=1)
    for (images, labels), (images_again, labels_again) in zip(second_epoch, resumed, strict=True):
        assert torch.equal(labels, labels_again) and torch.equal(images, images_again)


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "folder", "synthetic"])
def test_an_epoch_started_mid_way_gives_the_batches_of_a_whole_pass(
    photo_shards, tmp_path, real_photos, demo_imagenet, backend
):
    """`set_epoch(epoch, start_step=k)`, as a run resumed mid-epoch asks: batches k, k+1, ... of that
    epoch, each equal to a whole pass's (order, crops, flips, TrivialAugment), and then the next
    epoch goes on as usual. The torch backend's crops do not depend on its number of workers."""
    from tests.conftest import make_photo_tree

    data = str(photo_shards)
    if backend == "folder":
        data = str(make_photo_tree(tmp_path, real_photos, demo_imagenet, num_classes=40))
    settings = dict(auto_augment="trivial_augment_wide", workers=2)
    whole_passes = []
    straight = create_loader(data, "train", config(backend, **settings))
    for epoch in (1, 2):
        straight.set_epoch(epoch)
        whole_passes.append(list(straight))
    straight.close()
    if backend == "torch":
        settings["workers"] = 1
    loader = create_loader(data, "train", config(backend, **settings))
    start = 3
    assert loader.steps_per_epoch > start
    try:
        loader.set_epoch(1, start_step=start)
        resumed = [list(loader)]
        loader.set_epoch(2)
        resumed.append(list(loader))
        loader.set_epoch(2, start_step=loader.steps_per_epoch)  # saved at an epoch's last step
        assert list(loader) == []
        with pytest.raises(ValueError, match=f"start_step {loader.steps_per_epoch + 1} is outside epoch 2"):
            loader.set_epoch(2, start_step=loader.steps_per_epoch + 1)
    finally:
        loader.close()
    assert [len(p) for p in resumed] == [len(whole_passes[0]) - start, len(whole_passes[1])]
    for got, expected in zip(resumed[0] + resumed[1], whole_passes[0][start:] + whole_passes[1], strict=True):
        assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@pytest.mark.parametrize(
    ("earlier_world", "earlier_batch", "batches_read", "world_size", "batch_size"),
    [(2, 4, 3, 3, 3), (4, 2, 2, 1, 8), (3, 3, 1, 2, 5), (1, 8, 4, 4, 2)],
)
def test_a_resumed_epoch_reads_what_the_earlier_split_had_not(
    photo_shards, earlier_world, earlier_batch, batches_read, world_size, batch_size
):
    """A run stopped mid-epoch and resumed on another number of processes or batch size: from the
    start step on, the new ranks read the samples the earlier ranks had not, each once. Only the
    rounding of the position to the new run's steps leaves some out (or repeats some) of that epoch."""
    epoch, total = 1, read_manifest(photo_shards).splits["train"].samples
    earlier_keys = []
    for rank in range(earlier_world):
        settings = config("torch", batch_size=earlier_batch)
        loader = create_loader(str(photo_shards), "train", settings, rank, earlier_world)
        loader.set_epoch(epoch)
        earlier_keys += loader.sample_keys()[: batches_read * earlier_batch]
        earlier_steps = loader.steps_per_epoch
    earlier = EarlierSplit(earlier_world, earlier_batch, batches_read, seed=0)
    rest_keys = []
    for rank in range(world_size):
        loader = create_loader(str(photo_shards), "train", config("torch", batch_size=batch_size), rank, world_size)
        start = batches_read * loader.steps_per_epoch // earlier_steps  # the same share of the epoch, as the trainer
        loader.set_epoch(epoch, start, earlier)
        keys = loader.sample_keys()
        assert len(keys) == loader.steps_per_epoch * batch_size
        rest_keys += keys[start * batch_size :]
    assert len(set(rest_keys)) == len(rest_keys)
    both = Counter(earlier_keys + rest_keys)
    assert len(set(earlier_keys)) == len(earlier_keys) and len(both) <= total
    overlap = len(earlier_keys) + len(rest_keys) - total
    assert sum(n - 1 for n in both.values()) == max(0, overlap)  # read twice: only what the rest could not fill
    assert total - len(both) == max(0, -overlap)  # left out: only what the rest had no steps for
    assert abs(overlap) < 2 * max(earlier_world * earlier_batch, world_size * batch_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_reads_the_rest_of_a_resumed_epoch(photo_shards, backend):
    """The batches from the start step hold the samples `sample_keys` names for a resumed epoch
    (the rest of what two earlier ranks had not read), though the loader had gone on to read that
    epoch's unbroken batches ahead, and the next epoch is read as usual."""
    label_of = labels_by_key(photo_shards, "train")
    unbroken = create_loader(str(photo_shards), "train", config(backend))
    next_epoch = collect(unbroken, epoch=2)
    loader = create_loader(str(photo_shards), "train", config(backend))
    try:
        loader.set_epoch(0)
        list(loader)
        loader.set_epoch(1, start_step=2, earlier=EarlierSplit(2, 4, 4, seed=0))
        keys = loader.sample_keys()[2 * 8 :]
        labels = torch.cat([labels for _, labels in loader]).tolist()
        assert labels == [label_of[key] for key in keys]
        unbroken.set_epoch(1, start_step=2)
        assert keys != unbroken.sample_keys()[2 * 8 :]
        loader.set_epoch(2)
        for (images, labels), (images_again, labels_again) in zip(loader, next_epoch, strict=True):
            assert torch.equal(labels, labels_again) and torch.equal(images, images_again)
    finally:
        loader.close()
        unbroken.close()


def test_a_dali_pipeline_a_few_batches_behind_is_read_on_to_the_start_step(photo_shards):
    """One pass read whole, then the next epoch started at step 2: no new pipeline (its stream is
    two batches behind); started at a step it has passed, a new one."""
    loader = create_loader(str(photo_shards), "train", config("dali-cpu"))
    try:
        loader.set_epoch(0)
        list(loader)
        loader.set_epoch(1, start_step=2)
        from_step_2 = list(loader)
        assert loader.pipelines_built == 1
        loader.set_epoch(1, start_step=1)
        from_step_1 = list(loader)
        assert loader.pipelines_built == 2
    finally:
        loader.close()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(from_step_2, from_step_1[1:], strict=True))


def test_train_order_differs_between_epochs(photo_shards):
    loader = create_loader(str(photo_shards), "train", config("dali-cpu"))
    first = torch.cat([labels for _, labels in collect(loader, 0)])
    second = torch.cat([labels for _, labels in collect(loader, 1)])
    assert not torch.equal(first, second)


def test_folder_backend_and_seed_dataset(tmp_path, real_photos, demo_imagenet):
    from pipeline.folder import ImageNetDataset
    from tests.conftest import make_photo_tree

    tree = make_photo_tree(tmp_path, real_photos, demo_imagenet, num_classes=24)
    loader = create_loader(str(tree), "val", config("folder"))
    keys = loader.sample_keys()
    labels = torch.cat([labels for _, labels in collect(loader)]).tolist()
    dataset = ImageNetDataset(tree / "val", is_training=False, image_size=64)
    assert [label for label in labels if label != PAD_LABEL] == [label for _, label in dataset.samples]
    assert keys[: len(dataset)] == [Path(path).stem for path, _ in dataset.samples]  # a folder's keys: file names
    image, label = dataset[0]
    assert image.shape == (3, 64, 64) and label == 0
    # ImageNet's val as downloaded is flat: the error says where its labels go in
    with pytest.raises(ValueError, match=re.escape(f"{demo_imagenet / 'val'}: no class folders (expected ")) as caught:
        create_loader(str(demo_imagenet), "val", config("folder"))
    assert "a flat folder such as ImageNet's val needs its labels: convert it with tools.make_shards" in str(
        caught.value
    )


def copy_shards(photo_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(photo_shards, copy)
    return copy


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_missing_or_truncated_shard_is_named_before_the_first_step(photo_shards, tmp_path, backend):
    shards = copy_shards(photo_shards, tmp_path)
    first, second = read_manifest(shards).splits["train"].shards[:2]
    (shards / first.file).unlink()
    with pytest.raises(ShardError, match=f"{first.file}: listed in manifest.json but missing"):
        create_loader(str(shards), "train", config(backend))
    shutil.copy(photo_shards / first.file, shards / first.file)
    with open(shards / second.file, "r+b") as f:
        f.truncate(second.bytes // 2)
    with pytest.raises(ShardError, match=f"{second.file}: .* bytes but manifest.json says"):
        create_loader(str(shards), "train", config(backend))


def test_index_that_does_not_match_its_tar_is_named(photo_shards, tmp_path):
    shards = copy_shards(photo_shards, tmp_path)
    shard = read_manifest(shards).splits["val"].shards[0]
    lines = (shards / shard.index_file).read_text().splitlines()
    (shards / shard.index_file).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ShardError, match=shard.index_file):
        create_loader(str(shards), "val", config("dali-cpu"))


def test_index_entry_past_the_end_of_its_tar_is_named(photo_shards, tmp_path):
    """Any sample, not only the last: the DALI loaders read the tars mapped, where it would come out short."""
    shards = copy_shards(photo_shards, tmp_path)
    shard = read_manifest(shards).splits["train"].shards[0]
    lines = (shards / shard.index_file).read_text().splitlines()
    fields = lines[2].split()  # lines[0] is the header
    fields[1] = str(shard.bytes)  # the first member now starts at the tar's end
    lines[2] = " ".join(fields)
    (shards / shard.index_file).write_text("\n".join(lines) + "\n")
    key = fields[3].split(".")[0]
    with pytest.raises(ShardError, match=f"{shard.index_file}: does not match {shard.file} \\(sample {key} ends past"):
        create_loader(str(shards), "train", config("dali-cpu"))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "{index}: listed in manifest.json but missing"),
        ("header", "{index}: not a DALI v1.2 index file"),
        ("fields", "{index}: bad index line .* \\(13 fields, not groups of 4\\)"),
        ("members", "{index}: bad index line .* \\(no cls member\\)"),
        ("empty split", "manifest.json: the 'train' split has no shards"),
    ],
)
def test_damaged_index_files_are_named_before_the_first_step(photo_shards, tmp_path, damage, message):
    """An index file missing, of another format, or with a line that is not whole samples' members,
    and a split that lists no shards: create_loader names the file, whatever reads the shards."""
    shards = copy_shards(photo_shards, tmp_path)
    shard = read_manifest(shards).splits["train"].shards[0]
    index = shards / shard.index_file
    lines = index.read_text().splitlines()  # lines[0] is the header: "v1.2 <samples>"
    if damage == "missing":
        index.unlink()
    elif damage == "header":
        index.write_text("\n".join(["v9.9 x", *lines[1:]]) + "\n")
    elif damage in ("fields", "members"):
        fields = lines[2].split()  # cls, jpg and json members: 12 fields
        lines[2] = " ".join(fields + ["stray"] if damage == "fields" else fields[4:])  # or no cls member
        index.write_text("\n".join(lines) + "\n")
    else:
        data = json.loads((shards / "manifest.json").read_text())
        data["splits"]["train"].update(shards=[], samples=0)
        (shards / "manifest.json").write_text(json.dumps(data))
    for backend in CPU_BACKENDS:
        with pytest.raises(ShardError, match=message.format(index=re.escape(str(index)))):
            create_loader(str(shards), "train", config(backend))


def test_manifest_problems_are_named(photo_shards, tmp_path):
    shards = copy_shards(photo_shards, tmp_path)
    with pytest.raises(ShardError, match="no 'test' split"):
        open_shard_set(shards, "test")
    (shards / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json: no manifest"):
        create_loader(str(shards), "val", config("torch"))


def damaged_jpeg(jpeg: bytes, damage: str) -> bytes:
    """'header': garbage where a marker should be, between the frame header and the scan data (DALI
    2.4 crashes on that in a batch of 32 or more: the loaders must name it first); 'scan': a JPEG of
    noise cut halfway through its scan data (DALI's decoder raises an error for it)."""
    if damage == "header":
        scan = jpeg.rindex(b"\xff\xda")  # the last start of scan: no 0xFFDA inside scan data
        return jpeg[:scan] + b"\x00garbage" * 50 + jpeg[scan:]
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(noise, "JPEG")
    whole = noise.getvalue()
    return whole[: (whole.index(b"\xff\xda") + len(whole)) // 2]


def shards_with_a_broken_jpeg(
    photo_shards: Path, tmp_path: Path, split: str, damage: str = "header"
) -> tuple[Path, str, str]:
    """A copy of the shards whose first `split` shard was rewritten with one broken JPEG: (dir, tar, key)."""
    shards = copy_shards(photo_shards, tmp_path)
    target = read_manifest(shards).splits[split].shards[0]
    samples = list(wds.WebDataset(str(shards / target.file), shardshuffle=False, empty_check=False))
    bad_key = samples[3]["__key__"]
    writer = ShardWriter(tmp_path, "rewritten")
    for sample in samples:
        jpg = damaged_jpeg(sample["jpg"], damage) if sample["__key__"] == bad_key else sample["jpg"]
        writer.add(encode_sample(sample["__key__"], [("cls", sample["cls"]), ("jpg", jpg), ("json", sample["json"])]))
    info = writer.close()
    shutil.move(tmp_path / info.file, shards / target.file)
    shutil.move(tmp_path / info.index_file, shards / target.index_file)
    data = json.loads((shards / "manifest.json").read_text())
    data["splits"][split]["shards"][0].update(bytes=info.bytes, sha256=info.sha256)
    (shards / "manifest.json").write_text(json.dumps(data))
    return shards, target.file, bad_key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_undecodable_sample_is_named_with_its_shard(tmp_path, photo_shards, backend, split):
    """A shard not made by the converter, with one broken JPEG among good ones."""
    shards, tar, bad_key = shards_with_a_broken_jpeg(photo_shards, tmp_path, split, damage="scan")
    loader = create_loader(str(shards), split, config(backend))
    loader.set_epoch(0)
    with pytest.raises(SampleDecodeError, match=f"{tar}: sample {bad_key}"):
        for _ in loader:
            pass
    assert not multiprocessing.active_children(), "DataLoader workers are stopped with the error, not left running"
    if backend == "torch-uint8":  # its workers persisted across passes: a new pass starts new ones
        with pytest.raises(SampleDecodeError, match=f"{tar}: sample {bad_key}"):
            for _ in loader:
                pass
        assert not multiprocessing.active_children()
    loader.close()


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("batch_size", [8, 32])
def test_a_jpeg_header_dali_cannot_parse_is_named_not_a_crash(tmp_path, photo_shards, split, batch_size):
    """Garbage between a JPEG's markers before its scan data: DALI 2.4 killed the process (SIGSEGV)
    on it in a batch of 32 or more. The loader checks each header on first read and names the
    sample. (PIL's libjpeg skips such bytes with a warning, so the torch backends decode it.)"""
    shards, tar, bad_key = shards_with_a_broken_jpeg(photo_shards, tmp_path, split, damage="header")
    loader = create_loader(str(shards), split, config("dali-cpu", batch_size=batch_size))
    loader.set_epoch(0)
    with pytest.raises(SampleDecodeError, match=f"{tar}: sample {bad_key}: cannot be decoded \\(JPEG marker expected"):
        for _ in loader:
            pass
    loader.close()


def test_a_failed_dali_pipeline_cannot_hang_a_forked_process(tmp_path, photo_shards):
    """DataLoader workers are forked. A DALI pipeline left in a reference cycle (an exception's traceback
    holds one) and finalized in the child, where its threads do not exist, hung the child (seen in CI)."""
    import gc
    import os
    import time

    shards, _, _ = shards_with_a_broken_jpeg(photo_shards, tmp_path, "val", damage="scan")  # DALI's decoder fails
    gc.disable()  # keep the cycle for the child to collect, as an unlucky fork would
    try:
        loader = create_loader(str(shards), "val", config("dali-cpu"))
        loader.set_epoch(0)
        try:
            for _ in loader:
                pass
        except SampleDecodeError:
            pass
        loader.close()
        del loader
        child = os.fork()
        if child == 0:
            gc.collect()
            os._exit(0)
    finally:
        gc.enable()
    deadline = time.monotonic() + 30
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(child, 9)
            os.waitpid(child, 0)
            pytest.fail("the forked process hung finalizing a DALI pipeline")
        time.sleep(0.1)


def test_val_loader_can_be_read_again_after_a_partial_pass(photo_shards):
    loader = create_loader(str(photo_shards), "val", config("dali-cpu"))
    loader.set_epoch(0)
    next(iter(loader))  # abandoned after one batch
    full = torch.cat([labels for _, labels in loader])
    again = torch.cat([labels for _, labels in loader])
    loader.close()
    assert torch.equal(full, again) and len(full) == loader.steps_per_epoch * 8
    assert loader.pipelines_built == 1, "passes after the first reuse its pipeline"


@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_graph_is_accepted_by_dali_without_a_gpu(train):
    """Defining a pipeline checks every operator argument against DALI's schema; only build needs CUDA."""
    from pipeline.dali_pipeline import imagenet_pipeline

    imagenet_pipeline(
        source=lambda: ([], None), train=train, image_size=224, val_resize=256, decode_on_gpu=True,
        hw_decoder_load=0.65, output_float16=True, batch_size=8, num_threads=2, device_id=0,
        prefetch_queue_depth=2, seed=1,
    )  # fmt: skip


def labels_of_part(photo_shards: Path, split: str, part) -> Counter:
    from pipeline.sample_table import shard_table

    stored = manifest_labels_in_order(photo_shards, split)
    return Counter(stored[row] for row in shard_table(open_shard_set(photo_shards, split)).rows(part).tolist())


@pytest.mark.parametrize("world_size", [1, 3])
def test_dali_epochs_are_exact_and_share_one_pipeline(photo_shards, world_size):
    """Epoch after epoch each rank reads exactly its part of the split, and no epoch switch builds a pipeline."""
    from pipeline.split import split_train

    stored = Counter(manifest_labels_in_order(photo_shards, "train"))
    sizes = open_shard_set(photo_shards, "train").sizes
    loaders = [create_loader(str(photo_shards), "train", config("dali-cpu"), r, world_size) for r in range(world_size)]
    for epoch in range(3):
        read_by_all = Counter()
        for rank, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            read = Counter(label for _, labels in loader for label in labels.tolist())
            assert read == labels_of_part(photo_shards, "train", split_train(sizes, rank, world_size, 8, epoch, 0))
            read_by_all += read
        assert not read_by_all - stored and stored.total() - read_by_all.total() < world_size * 8
    for loader in loaders:
        assert loader.pipelines_built == 1
        loader.close()


def test_a_pass_left_near_its_end_is_drained_and_one_left_early_restarts(photo_shards):
    """The trainer may leave a few batches (accumulation); a benchmark stops anywhere. Both stay exact."""
    from pipeline.split import split_train

    sizes = open_shard_set(photo_shards, "train").sizes
    loader = create_loader(str(photo_shards), "train", config("dali-cpu", batch_size=2))
    assert loader.steps_per_epoch > 20
    for epoch, leave, builds in [(0, 1, 1), (1, 20, 1), (2, 0, 2)]:
        loader.set_epoch(epoch)
        batches = iter(loader)
        read = Counter(label for _ in range(loader.steps_per_epoch - leave) for label in next(batches)[1].tolist())
        batches.close()
        part = labels_of_part(photo_shards, "train", split_train(sizes, 0, 1, 2, epoch, 0))
        assert read == part if leave == 0 else not read - part
        assert loader.pipelines_built == builds, (epoch, loader.pipelines_built)
    loader.close()


def test_shard_cut_short_while_training_is_named_not_hung(photo_shards, tmp_path):
    """A shard replaced under a running loader: the read error names the file and sample, then the loader stops."""
    import threading

    shards = copy_shards(photo_shards, tmp_path)
    loader = create_loader(str(shards), "train", config("dali-cpu"))
    for shard in read_manifest(shards).splits["train"].shards:
        with open(shards / shard.file, "r+b") as f:
            f.truncate(1024)
    loader.set_epoch(0)
    with pytest.raises(ShardError, match=r"train-\d+\.tar: sample .*bytes expected at offset"):
        for _ in loader:
            pass
    loader.close()
    assert not [t for t in threading.enumerate() if t.name == "batch-stream"], "the reader thread stopped"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_raw_pixel_shards_read_as_their_jpeg_source(raw_and_jpeg_shards, backend, split):
    """Pixels stored by the converter are what decoding the JPEG gives: the same batches, crops and
    flips included, within the backends' val tolerance (DALI skips its decoder on them)."""
    raw, jpeg = raw_and_jpeg_shards
    assert read_manifest(raw).splits[split].image_ext == "ppm" and read_manifest(jpeg).splits[split].image_ext == "jpg"
    batches = [collect(create_loader(str(d), split, config(backend)), epoch=1) for d in (raw, jpeg)]
    assert len(batches[0]) == len(batches[1]) > 0
    for (raw_images, raw_labels), (jpeg_images, jpeg_labels) in zip(*batches, strict=True):
        assert torch.equal(raw_labels, jpeg_labels)
        assert raw_images.is_contiguous(memory_format=torch.channels_last)
        difference = (raw_images - jpeg_images).abs()
        assert difference.max() <= VAL_AGREEMENT_MAX_ABS
        assert difference.mean() <= VAL_AGREEMENT_MEAN_ABS


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_raw_pixel_sample_with_missing_pixels_is_named_with_its_shard(raw_and_jpeg_shards, tmp_path, backend):
    """A PPM whose pixels stop short of what its header says (a shard not made by the converter)."""
    raw, _ = raw_and_jpeg_shards
    shards = copy_shards(raw, tmp_path)
    target = read_manifest(shards).splits["train"].shards[0]
    samples = list(wds.WebDataset(str(shards / target.file), shardshuffle=False, empty_check=False))
    bad_key = samples[5]["__key__"]
    writer = ShardWriter(tmp_path, "rewritten")
    for sample in samples:
        ppm = sample["ppm"][:-300] if sample["__key__"] == bad_key else sample["ppm"]
        writer.add(encode_sample(sample["__key__"], [("cls", sample["cls"]), ("ppm", ppm), ("json", sample["json"])]))
    info = writer.close()
    shutil.move(tmp_path / info.file, shards / target.file)
    shutil.move(tmp_path / info.index_file, shards / target.index_file)
    data = json.loads((shards / "manifest.json").read_text())
    data["splits"]["train"]["shards"][0].update(bytes=info.bytes, sha256=info.sha256)
    (shards / "manifest.json").write_text(json.dumps(data))
    loader = create_loader(str(shards), "train", config(backend))
    loader.set_epoch(0)
    with pytest.raises(SampleDecodeError, match=f"{target.file}: sample {bad_key}: cannot be decoded"):
        for _ in loader:
            pass
    loader.close()


@pytest.mark.parametrize("backend", ["dali-cpu", "folder"])
def test_without_dali_installed_the_dali_backends_say_how_to_install_it(photo_shards, monkeypatch, backend):
    """A machine where DALI's wheel did not install gets the pip command, not an import traceback."""
    for module in ("pipeline.dali_loader", "pipeline.dali_pipeline"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(
        ValueError, match=rf"data.backend '{backend}' needs NVIDIA DALI.*pip install nvidia-dali-cuda130"
    ):
        create_loader(str(photo_shards), "val", config(backend))
    assert len(collect(create_loader(str(photo_shards), "val", config("torch")))) > 0  # the fallback still runs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loaders_leave_torchs_global_generator_alone(photo_shards, backend):
    """The trainer's own random draws (MixUp, CutMix, dropout) come from torch's global generator,
    whose state checkpoints save: a loader drawing from it at other times than in the uninterrupted
    run would make a resumed run draw differently."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = create_loader(str(photo_shards), "train", config(backend))
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len([batch for _, batch in zip(range(2), loader, strict=False)]) == 2
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)
