"""Exact evaluation: correct counts on the device, one all-reduce at the end."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.loader import PAD_LABEL
from train.distributed import DistContext, all_reduce_sum
from train.step import autocast

NO_LABEL = -1  # fills the rows of a label-set tensor past each sample's own labels
# Per-class counts include which class each class is most often mistaken for, from a classes x
# classes float64 matrix: 8 MB for ImageNet's 1000 classes, 134 MB at this limit (above: left out).
MAX_CONFUSION_CLASSES = 4096


class EvalCounts:
    """Running top-1/top-5 correct counts, summed loss and sample count, kept on the device.

    Padding samples (label -1) are left out, so the totals are exact for any world size, unlike an
    average of per-batch means (biased by a smaller last batch) or a sampler that repeats images.
    With `label_sets`, also the counts against a set of right answers per sample (ImageNet-ReaL's).
    """

    def __init__(self, device: torch.device, label_sets: bool = False, num_classes: int = 0):
        # float64: exact integer counts up to 2**53, and a loss sum that barely depends on order.
        # correct1, correct5, loss, count; with label sets: set-correct1, set-correct5, samples that have a set
        self.totals = torch.zeros(7 if label_sets else 4, dtype=torch.float64, device=device)
        # With num_classes, the same per label: samples, correct1, correct5, loss (one row per class),
        # and a flattened confusion matrix: [label * num_classes + top-1 prediction] counts.
        self.by_class = torch.zeros(num_classes, 4, dtype=torch.float64, device=device) if num_classes else None
        self.confusion = None
        if 0 < num_classes <= MAX_CONFUSION_CLASSES:
            self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, label_sets: torch.Tensor | None = None) -> None:
        """`label_sets`: N x L class indices, each sample's right answers, filled with NO_LABEL; a
        sample with none (ReaL's images that show no ImageNet class) is left out of those counts."""
        valid = labels != PAD_LABEL
        logits, labels = logits[valid].float(), labels[valid]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        counts = [hits[:, :1].any(dim=1).sum(), hits.any(dim=1).sum(), loss.double().sum(), valid.sum()]
        if self.by_class is not None:
            classes = len(self.by_class)
            if logits.shape[1] != classes:
                raise ValueError(f"per-class counts for {classes} classes, but the logits score {logits.shape[1]}")
            ones = torch.ones_like(loss, dtype=torch.float64)
            rows = [ones, hits[:, :1].any(dim=1), hits.any(dim=1), loss]
            self.by_class.index_add_(0, labels, torch.stack([row.double() for row in rows], dim=1))
            if self.confusion is not None:
                self.confusion.index_add_(0, labels * classes + top5[:, 0], ones)
        if label_sets is not None:
            label_sets = label_sets[valid]
            in_set = (top5[:, :, None] == label_sets[:, None, :]).any(dim=2)  # each of the top 5 is a right answer
            has_set = (label_sets != NO_LABEL).any(dim=1)
            counts += [in_set[:, 0].sum(), in_set.any(dim=1).sum(), has_set.sum()]  # no set: no answer is in it
        self.totals += torch.stack([count.double() for count in counts])

    def reduce(self, ctx: DistContext) -> dict[str, Any]:
        """All-reduce once and return acc1/acc5 (percent), mean loss and the sample count (and with
        label sets real_acc1, real_acc5 and real_samples, the samples that have a set; with classes,
        `per_class`: a [samples, correct1, correct5, loss sum, mistaken for, mistaken times] row per
        label, the last two the class its samples were most often predicted as instead (the lowest
        index among equals) and how many times, None when never or above MAX_CONFUSION_CLASSES)."""
        parts = [self.totals] + [t.flatten() for t in (self.by_class, self.confusion) if t is not None]
        summed = all_reduce_sum(torch.cat(parts), ctx).cpu()  # the one sync point of evaluation
        totals = summed[: len(self.totals)].tolist()
        correct1, correct5, loss_sum, count = totals[:4]
        if count == 0:
            raise RuntimeError("evaluation saw no samples")
        metrics = {
            "acc1": 100.0 * correct1 / count,
            "acc5": 100.0 * correct5 / count,
            "loss": loss_sum / count,
            "samples": int(count),
        }
        if len(totals) > 4:
            set_correct1, set_correct5, with_set = totals[4:]
            metrics["real_acc1"] = 100.0 * set_correct1 / max(with_set, 1)
            metrics["real_acc5"] = 100.0 * set_correct5 / max(with_set, 1)
            metrics["real_samples"] = int(with_set)
        if self.by_class is not None:
            start, classes = len(self.totals), len(self.by_class)
            rows = summed[start : start + 4 * classes].view(classes, 4).tolist()
            mistakes = [(None, None)] * classes
            if self.confusion is not None:
                wrong = summed[start + 4 * classes :].view(classes, classes).fill_diagonal_(0)
                times, mistaken_for = wrong.max(dim=1)  # the first of equal maxima
                mistakes = [
                    (int(c), int(t)) if t > 0 else (None, None) for c, t in zip(mistaken_for, times, strict=True)
                ]
            metrics["per_class"] = [[*row, *mistake] for row, mistake in zip(rows, mistakes, strict=True)]
        return metrics


def val_logits(
    model: torch.nn.Module, images: torch.Tensor, flip: bool, device: torch.device, precision: str
) -> torch.Tensor:
    """`model`'s logits for a batch, as evaluation scores it: under `precision`'s autocast, and with
    `flip` the mean of each image's and its mirror's logits (in float32)."""
    with autocast(device, precision):
        logits = model(images)
        if flip:
            logits = (logits.float() + model(images.flip(3)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    ctx: DistContext,
    precision: str,
    flip: bool = False,
    class_columns: torch.Tensor | None = None,
    label_sets: torch.Tensor | None = None,
    per_class: int = 0,
    predictions: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy and mean cross-entropy of `model` over the whole val split.

    `flip`: the logits are the mean of the image's and its mirror's (test-time augmentation).
    `class_columns`: label i is scored by the model's output `class_columns[i]`, and the prediction
    is made among those outputs only (how ImageNet-A and ImageNet-R, 200 of its classes, are scored).
    `label_sets`: a row of right answers per sample of this rank, in the loader's order (see
    `EvalCounts.update`), scored besides the labels: ImageNet-ReaL's top-1/top-5.
    `per_class`: the number of labels; also count each label's samples, hits and loss (`per_class`).
    `predictions`: also return this rank's own (not reduced) top-5 classes and probabilities of
    each sample, in the loader's order, padding included: `predictions` = (labels, classes, probabilities).
    """
    was_training = model.training
    model.eval()
    counts = EvalCounts(ctx.device, label_sets is not None, per_class)
    kept: list[tuple[torch.Tensor, ...]] = []
    seen = 0
    for images, labels in loader:
        logits = val_logits(model, images, flip, ctx.device, precision)
        if class_columns is not None:
            logits = logits.index_select(1, class_columns)
        batch_sets = label_sets[seen : seen + len(labels)] if label_sets is not None else None
        seen += len(labels)
        counts.update(logits, labels, batch_sets)
        if predictions:
            probabilities, classes = logits.float().softmax(dim=1).topk(min(5, logits.shape[1]), dim=1)
            kept.append((labels, classes, probabilities))  # on the device: no sync per batch
    model.train(was_training)
    metrics = counts.reduce(ctx)
    if predictions:
        empty = (torch.empty(0, dtype=torch.int64), torch.empty(0, 5, dtype=torch.int64), torch.empty(0, 5))
        metrics["predictions"] = tuple(torch.cat(parts).cpu() for parts in zip(*kept, strict=True)) if kept else empty
    return metrics
