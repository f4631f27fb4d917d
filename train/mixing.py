"""MixUp and CutMix on training batches, as torchvision's reference recipes and timm offer them.

Applied on the device, after the loader: each batch is mixed with itself rolled by one, and its
labels become the matching class probabilities (soft targets for the cross-entropy). The random
draws use torch's generator, which checkpoints save and restore, so a resumed run mixes alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> Mixer | None:
    """MixUp (weights ~ Beta(mixup_alpha, mixup_alpha)), CutMix, or one of the two at random for
    each batch when both are on (torchvision's reference scripts); None when both alphas are 0."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
