"""The weight EMA's update, without a host sync.

torch's `AveragedModel` holds the averaged copy (its state dict is the checkpoints' "ema", which
`train.evaluate --ema` reads), but its `update_parameters` reads its step counter on the host twice
per call (`bool(n_averaged == 0)`, `n_averaged > 0`): on a GPU that waits for the step's kernels
every step, so the host cannot queue the next step ahead. `update_ema` makes the same update with
the decision to copy taken on the host by the caller.
"""

from __future__ import annotations

import itertools

import torch
from torch.optim.swa_utils import AveragedModel


@torch.no_grad()
def update_ema(ema: AveragedModel, model: torch.nn.Module, decay: float, copy: bool) -> None:
    """One update of `ema` (built with `use_buffers=True`) from `model`, equal to `update_parameters`
    with `get_ema_multi_avg_fn(decay)`: with `copy` (the first update, or a restart) the model's
    parameters and buffers are copied; otherwise each floating tensor moves 1 - decay of the way to
    the model's, and integer buffers (BatchNorm's batch counts) take torch's formula for them."""
    averaged = [t.detach() for t in itertools.chain(ema.module.parameters(), ema.module.buffers())]
    current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
    if copy:
        torch._foreach_copy_(averaged, current)
        ema.n_averaged.fill_(1)
        return
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for mine, theirs in zip(averaged, current, strict=True):
        pair = by_dtype.setdefault(mine.dtype, ([], []))
        pair[0].append(mine)
        pair[1].append(theirs)
    for dtype, (mine, theirs) in by_dtype.items():
        if dtype.is_floating_point or dtype.is_complex:
            torch._foreach_lerp_(mine, theirs, 1 - decay)
        else:
            for a, b in zip(mine, theirs, strict=True):
                a.copy_(a * decay + b * (1 - decay))
    ema.n_averaged += 1
