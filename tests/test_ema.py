"""The weight EMA's update against torch's own."""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from train.ema import update_ema
from train.model import build_model


def test_update_ema_is_torchs_update_parameters_bit_for_bit():
    """Over copies (first update, warmup restarts) and averaging steps, parameters, BatchNorm
    statistics and batch counts (an integer buffer) and the step counter come out identical."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    decay = 0.9
    ours = AveragedModel(model, use_buffers=True)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, restart in enumerate([True, True, False, False, True, False, False]):
        model(torch.randn(4, 3, 32, 32)).sum().backward()  # BatchNorm statistics move too
        optimizer.step()
        optimizer.zero_grad()
        update_ema(ours, model, decay, copy=restart)
        if restart:
            torchs.n_averaged.zero_()
        torchs.update_parameters(model)
        for (name, mine), theirs in zip(ours.state_dict().items(), torchs.state_dict().values(), strict=True):
            assert torch.equal(mine, theirs), (step, name)
    averaged = ours.state_dict()["module.fc.weight"]
    assert not torch.equal(averaged, model.fc.weight), "the last steps averaged"
