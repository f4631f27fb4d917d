"""Random erasing: one rectangle per chosen image, drawn as torchvision draws it, set to 0."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from train.erasing import AREA, ASPECT_RATIO, erase_boxes, random_erasing


def ones_batch(count: int, size: int = 32) -> torch.Tensor:
    """Images of ones (bfloat16, channels_last, as the loaders yield them): erased pixels show as 0."""
    images = torch.ones(count, 3, size, size, dtype=torch.bfloat16)
    return images.contiguous(memory_format=torch.channels_last)


def test_each_chosen_image_gets_one_rectangle_of_zeros_in_every_channel():
    torch.manual_seed(0)
    images = ones_batch(64)
    erased = random_erasing(images, 1.0)
    assert erased.dtype == images.dtype and erased.is_contiguous(memory_format=torch.channels_last)
    zero = erased == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])
    shares = []
    for mask in zero[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert len(rows) and len(cols), "with p = 1 every image here has a rectangle that fits"
        height, width = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width, "one block"
        assert mask.sum() == height * width, "a full rectangle"
        shares.append(height * width / 32**2)
        assert ASPECT_RATIO[0] * 0.6 <= height / width <= ASPECT_RATIO[1] / 0.6  # rounding to whole pixels
    assert AREA[0] * 0.5 <= min(shares) and max(shares) <= AREA[1] * 1.3
    assert len(set(shares)) > 10, "a rectangle of its own for each image"
    assert torch.equal(images, ones_batch(64)), "the input is left as it was"


def test_probability_is_the_share_of_images_erased():
    torch.manual_seed(1)
    boxes = erase_boxes(20_000, 224, 224, 0.25)
    erased = (boxes[:, 2] > 0).float().mean().item()
    assert abs(erased - 0.25) < 0.015
    top, left, height, width = boxes[boxes[:, 2] > 0].T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 224).all() and (left + width <= 224).all()
    assert erase_boxes(100, 224, 224, 0.0)[:, 2:].eq(0).all()


def test_the_rectangles_are_distributed_as_torchvisions():
    """Areas and aspect ratios against torchvision's RandomErasing on single images, same settings."""
    torch.manual_seed(2)
    ours = erase_boxes(4000, 64, 64, 1.0)
    reference = v2.RandomErasing(p=1.0, scale=AREA, ratio=ASPECT_RATIO)
    image = torch.ones(3, 64, 64)
    theirs = []
    for _ in range(4000):
        drawn = reference.make_params([image])
        theirs.append((drawn["h"], drawn["w"]))
    theirs = torch.tensor(theirs, dtype=torch.float)
    for column, values in ((2, theirs[:, 0]), (3, theirs[:, 1])):
        mine = ours[:, column].float()
        assert abs(mine.mean() - values.mean()) < 0.05 * values.mean()
        assert abs(mine.std() - values.std()) < 0.08 * values.std()
