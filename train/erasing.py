"""Random erasing (Zhong et al. 2017) on training batches, as torchvision's reference recipes use it.

Each image, with probability p, gets one rectangle set to 0: the mean colour, since the images
are already normalized (torchvision's `RandomErasing` default). The rectangle is drawn as
torchvision draws it: area 2-33% of the image, aspect ratio 0.3-3.3 (log-uniform), up to 10 tries
for one that fits, none if no try fits.

Written here rather than taken from torchvision: its `RandomErasing` given a batch erases the same
rectangle in every image, and calling it per image costs a few kernels per image each step. Here
the rectangles of a batch are drawn at once and applied in one masked fill on the device. The draws
use torch's generator on the CPU, which checkpoints save and restore, so a resumed run erases alike.
"""

from __future__ import annotations

import math

import torch

AREA = (0.02, 0.33)
ASPECT_RATIO = (0.3, 3.3)
ATTEMPTS = 10


def erase_boxes(count: int, height: int, width: int, probability: float) -> torch.Tensor:
    """Per image (top, left, box height, box width), int64 count x 4; a zero-sized box erases nothing."""
    area = height * width * torch.empty(count, ATTEMPTS).uniform_(*AREA)
    log_ratio = torch.empty(count, ATTEMPTS).uniform_(math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1]))
    box_h = torch.sqrt(area * torch.exp(log_ratio)).round().long()
    box_w = torch.sqrt(area / torch.exp(log_ratio)).round().long()
    fits = (box_h < height) & (box_w < width)
    first = fits.long().argmax(dim=1)  # the first try that fits (0 if none does: masked out below)
    rows = torch.arange(count)
    box_h, box_w = box_h[rows, first], box_w[rows, first]
    erased = (torch.rand(count) < probability) & fits.any(dim=1)
    top = (torch.rand(count) * (height - box_h + 1)).long()
    left = (torch.rand(count) * (width - box_w + 1)).long()
    return torch.stack([top, left, box_h * erased, box_w * erased], dim=1)


def random_erasing(images: torch.Tensor, probability: float) -> torch.Tensor:
    """`images` (N x C x H x W, normalized) with one rectangle per chosen image set to 0."""
    count, _, height, width = images.shape
    top, left, box_h, box_w = erase_boxes(count, height, width, probability).to(images.device).T
    y = torch.arange(height, device=images.device).view(1, height, 1)
    x = torch.arange(width, device=images.device).view(1, 1, width)
    top, left, bottom, right = (v.view(count, 1, 1) for v in (top, left, top + box_h, left + box_w))
    inside = (y >= top) & (y < bottom) & (x >= left) & (x < right)  # N x H x W
    erased = images.clone()  # keeps channels_last, which an out-of-place masked_fill here would not
    return erased.masked_fill_(inside.unsqueeze(1), 0)
