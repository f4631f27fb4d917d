"""MixUp and CutMix: what the trainer gets from `batch_mixer` for a batch of the loaders' layout."""

from __future__ import annotations

import pytest
import torch

from train.mixing import batch_mixer

CLASSES = 10


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight bfloat16 images in channels_last, as the loaders yield them, with distinct labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 16, 16, generator=generator).to(torch.bfloat16)
    return images.contiguous(memory_format=torch.channels_last), torch.arange(8)


def mixed_share(labels: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Each image's weight of its own label (the rest goes to the label of the image rolled in)."""
    return soft[torch.arange(len(labels)), labels]


def test_off_without_alphas():
    assert batch_mixer(CLASSES, 0.0, 0.0) is None


def test_mixup_blends_each_image_with_the_rolled_batch_as_its_labels_say():
    torch.manual_seed(0)
    images, labels = batch()
    mixed, soft = batch_mixer(CLASSES, 0.4, 0.0)(images, labels)
    assert mixed.dtype == torch.bfloat16 and mixed.is_contiguous(memory_format=torch.channels_last)
    assert soft.shape == (8, CLASSES) and torch.allclose(soft.sum(1), torch.ones(8))
    share = mixed_share(labels, soft)
    assert torch.allclose(soft[torch.arange(8), labels.roll(1)], 1 - share)
    lam = share[0].item()
    assert 0 < lam < 1 and torch.allclose(share, torch.full((8,), lam))
    expected = lam * images.float() + (1 - lam) * images.float().roll(1, 0)
    torch.testing.assert_close(mixed.float(), expected, atol=0.02, rtol=0.02)


def test_cutmix_pastes_one_box_of_the_rolled_batch_and_labels_it_by_area():
    torch.manual_seed(1)
    _, labels = batch()
    # Image i is filled with the value i, so each pixel tells which image it came from.
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16).to(torch.bfloat16)
    images = images.contiguous(memory_format=torch.channels_last)
    mixed, soft = batch_mixer(CLASSES, 0.0, 1.0)(images, labels)
    from_rolled = mixed == images.roll(1, 0)
    assert torch.equal((mixed == images) | from_rolled, torch.ones_like(from_rolled))
    box = from_rolled[0, 0]
    rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
    assert box.sum() == (len(rows) * len(cols)) and box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert torch.equal(from_rolled, box.expand_as(from_rolled))  # the same box in every image and channel
    assert torch.allclose(1 - mixed_share(labels, soft), box.float().mean().expand(8), atol=1e-6)


def test_with_both_each_batch_gets_one_of_them():
    torch.manual_seed(2)
    images, labels = batch()
    mixer = batch_mixer(CLASSES, 0.4, 1.0)
    kinds = set()
    for _ in range(20):
        mixed, soft = mixer(images, labels)
        whole_images = ((mixed == images) | (mixed == images.roll(1, 0))).all().item()
        kinds.add("cutmix" if whole_images else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_negative_alphas_are_a_config_error():
    from tests.conftest import REPO_ROOT
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optim.cutmix_alpha: must be 0"):
        load_config(str(REPO_ROOT / "configs" / "demo.yaml"), ["optim.cutmix_alpha=-1"])
