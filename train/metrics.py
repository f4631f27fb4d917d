"""Exact evaluation: correct counts on the device, one all-reduce at the end."""

from __future__ import annotations

import torch

from pipeline.loader import PAD_LABEL
from train.distributed import DistContext, all_reduce_sum
from train.step import autocast


class EvalCounts:
    """Running top-1/top-5 correct counts, summed loss and sample count, kept on the device.

    Padding samples (label -1) are left out, so the totals are exact for any world size, unlike an
    average of per-batch means (biased by a smaller last batch) or a sampler that repeats images.
    """

    def __init__(self, device: torch.device):
        # float64: exact integer counts up to 2**53, and a loss sum that barely depends on order.
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, count

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        valid = labels != PAD_LABEL
        logits, labels = logits[valid].float(), labels[valid]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        self.totals += torch.stack(
            [
                hits[:, :1].any(dim=1).sum().double(),
                hits.any(dim=1).sum().double(),
                loss.double().sum(),
                valid.sum().double(),
            ]
        )

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        """All-reduce once and return acc1/acc5 (percent), mean loss and the sample count."""
        totals = all_reduce_sum(self.totals.clone(), ctx).tolist()  # the one sync point of evaluation
        correct1, correct5, loss_sum, count = totals
        if count == 0:
            raise RuntimeError("evaluation saw no samples")
        return {
            "acc1": 100.0 * correct1 / count,
            "acc5": 100.0 * correct5 / count,
            "loss": loss_sum / count,
            "samples": int(count),
        }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    ctx: DistContext,
    precision: str,
    flip: bool = False,
    class_columns: torch.Tensor | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean cross-entropy of `model` over the whole val split.

    `flip`: the logits are the mean of the image's and its mirror's (test-time augmentation).
    `class_columns`: label i is scored by the model's output `class_columns[i]`, and the prediction
    is made among those outputs only (how ImageNet-A and ImageNet-R, 200 of its classes, are scored).
    """
    was_training = model.training
    model.eval()
    counts = EvalCounts(ctx.device)
    for images, labels in loader:
        with autocast(ctx.device, precision):
            logits = model(images)
            if flip:
                logits = (logits.float() + model(images.flip(3)).float()) / 2
        if class_columns is not None:
            logits = logits.index_select(1, class_columns)
        counts.update(logits, labels)
    model.train(was_training)
    return counts.reduce(ctx)
