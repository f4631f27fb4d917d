"""The training loss: cross-entropy, or binary cross-entropy per class as timm's recipes use it.

Both take class indices (N) or class probabilities (N x classes, after MixUp or CutMix) and apply
`optim.label_smoothing` alike: the target becomes `target * (1 - s) + s / classes`, which is what
timm's MixUp with label smoothing hands its BCE, and what cross-entropy's own smoothing computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("cross_entropy", "bce")


class BinaryCrossEntropy(torch.nn.Module):
    """One sigmoid per class against the (smoothed, optionally thresholded) target, averaged over
    images and classes, as timm's `--bce-loss`: the "ResNet strikes back" recipes train with it, as
    mixed images hold two classes at once. `target_threshold` (timm's `--bce-target-thresh`) turns
    every target probability above it into 1 and the rest into 0."""

    def __init__(self, label_smoothing: float = 0.0, target_threshold: float | None = None):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.target_threshold = target_threshold

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[-1]
        if target.ndim == 1:
            target = F.one_hot(target, num_classes)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # as autocast computes this loss
        target = target.to(dtype) * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        if self.target_threshold is not None:
            target = (target > self.target_threshold).to(dtype)
        return F.binary_cross_entropy_with_logits(logits, target)


def build_criterion(loss: str, label_smoothing: float, bce_target_threshold: float | None) -> torch.nn.Module:
    """The loss `optim.loss` names (validated by the config)."""
    if loss == "bce":
        return BinaryCrossEntropy(label_smoothing, bce_target_threshold)
    return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
