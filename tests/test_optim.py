"""LAMB and the BCE loss against timm's, the implementations the "ResNet strikes back" recipes ran.

timm is installed for the tests only (requirements-dev.txt) and is the reference here, as
torchvision is for the augmentations.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy as TimmBinaryCrossEntropy
from timm.optim import Lamb as TimmLamb

from train.config import ConfigError, load_config
from train.lamb import Lamb
from train.loss import build_criterion
from train.mixing import batch_mixer
from train.step import optimizer_step
from train.trainer import build_optimizer

CLASSES = 10


def parameters() -> list[torch.nn.Parameter]:
    """Tensors of a small network's shapes; one starts at zero, where the trust ratio must be 1."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (16,), (16,), (CLASSES, 64), (CLASSES,)]
    tensors = [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]
    tensors[4].zero_()
    return [torch.nn.Parameter(t) for t in tensors]


def decay_groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Weight decay on the matrices and kernels, none on the vectors: `optim.no_decay_bn_bias`."""
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.02},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def give_gradients(params: list[torch.nn.Parameter], step: int) -> None:
    """The same gradients to both optimizers, some steps large enough for the clipping to act."""
    generator = torch.Generator().manual_seed(100 + step)
    scale = 5.0 if step % 3 == 0 else 0.01
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale


def test_lamb_steps_as_timms_with_the_gradient_clipped_at_1():
    """timm's Lamb clips the global gradient norm at 1 itself; the trainer's optim.grad_clip=1 does it here."""
    ours, theirs = parameters(), parameters()
    optimizer = Lamb(decay_groups(ours), lr=8e-3)
    reference = TimmLamb(decay_groups(theirs), lr=8e-3)
    for step in range(20):
        give_gradients(ours, step)
        give_gradients(theirs, step)
        optimizer_step(optimizer, ours, grad_clip=1.0)
        reference.step()
        for got, expected in zip(ours, theirs, strict=True):
            torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    moved = [(p - q).norm() for p, q in zip(ours, parameters(), strict=True)]
    assert all(m > 0 for m in moved), "every tensor moved, the zero-initialised one too"


def test_the_step_returns_the_gradient_norm_before_clipping():
    """What log.grad_norm logs: the total L2 norm of all gradients as they were before clipping."""
    for grad_clip, grad_norm in ((0.5, False), (0.0, True), (0.0, False)):
        params = parameters()
        give_gradients(params, 0)  # large: the clipping acts
        expected = torch.cat([p.grad.flatten() for p in params]).double().norm().item()
        before = [p.detach().clone() for p in params]
        norm = optimizer_step(torch.optim.SGD(params, lr=1.0), params, grad_clip=grad_clip, grad_norm=grad_norm)
        if not (grad_clip or grad_norm):
            assert norm is None
            continue
        assert norm.item() == pytest.approx(expected, rel=1e-5)
        step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)]).norm().item()
        assert step == pytest.approx(grad_clip if grad_clip else expected, rel=1e-4), "the step itself was clipped"


def test_lamb_moves_each_decayed_tensor_by_lr_times_its_norm_and_resumes_from_its_state():
    params = parameters()
    optimizer = Lamb(decay_groups(params), lr=0.01)
    for step in range(3):
        give_gradients(params, step)
        optimizer.step()
    before = [p.detach().clone() for p in params]
    saved = copy.deepcopy(optimizer.state_dict())
    give_gradients(params, 3)
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    for p, b in zip(params, before, strict=True):
        if p.ndim > 1:  # the trust ratio: each layer's step is lr * ||w||, whatever its gradient's size
            torch.testing.assert_close((p - b).norm(), 0.01 * b.norm(), rtol=1e-5, atol=0)

    restored = [torch.nn.Parameter(b.clone()) for b in before]
    resumed = Lamb(decay_groups(restored), lr=0.01)
    resumed.load_state_dict(saved)
    for p, g in zip(restored, grads, strict=True):
        p.grad = g
    resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(params, restored, strict=True)), (
        "a resumed optimizer takes the same step"
    )


def test_the_config_builds_lamb_with_timms_defaults_and_the_recipe_groups():
    cfg = load_config("configs/demo.yaml", ["optim.optimizer=lamb", "optim.weight_decay=0.02"])
    optimizer = build_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)), cfg, 8e-3)
    assert type(optimizer) is Lamb
    assert (optimizer.defaults["betas"], optimizer.defaults["eps"]) == ((0.9, 0.999), 1e-6)
    groups = [(len(g["params"]), g["weight_decay"], g["lr"]) for g in optimizer.param_groups]
    assert groups == [(1, 0.02, 8e-3), (3, 0.0, 8e-3)]


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_on_class_indices_is_timms(threshold):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, CLASSES, generator=generator) * 3
    labels = torch.randint(0, CLASSES, (8,), generator=generator)
    ours = build_criterion("bce", 0.1, threshold)(logits, labels)
    expected = TimmBinaryCrossEntropy(smoothing=0.1, target_threshold=threshold)(logits, labels)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_on_mixed_labels_is_timms_mixup_with_label_smoothing(threshold):
    """The trainer mixes first (torchvision's MixUp, no smoothing) and the loss smooths; timm's
    MixUp smooths each one-hot before mixing. The targets agree. Two images: rolling the batch by
    one, as torchvision does, is then flipping it, as timm does."""
    torch.manual_seed(3)
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([2, 7])
    _, soft = batch_mixer(CLASSES, 0.4, 0.0)(images, labels)
    lam = soft[0, 2].item()
    assert 0 < lam < 1
    logits = torch.randn(2, CLASSES, generator=torch.Generator().manual_seed(4)) * 3
    ours = build_criterion("bce", 0.1, threshold)(logits, soft)
    timm_target = mixup_target(labels, CLASSES, lam=lam, smoothing=0.1)
    expected = TimmBinaryCrossEntropy(smoothing=0.0, target_threshold=threshold)(logits, timm_target)
    torch.testing.assert_close(ours, expected)


def test_bce_settings_that_cannot_apply_are_config_errors():
    with pytest.raises(ConfigError, match="optim.bce_target_threshold: applies to optim.loss bce, not cross_entropy"):
        load_config("configs/demo.yaml", ["optim.bce_target_threshold=0.2"])
    with pytest.raises(ConfigError, match=r"optim.bce_target_threshold: must be in \[0, 1\), got 1.5"):
        load_config("configs/demo.yaml", ["optim.loss=bce", "optim.bce_target_threshold=1.5"])
    with pytest.raises(ConfigError, match="optim.loss: 'focal' is not one of"):
        load_config("configs/demo.yaml", ["optim.loss=focal"])
