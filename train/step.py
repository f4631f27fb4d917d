"""One optimisation step, kept apart so the trainer and the benchmarks run the same code."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def set_cuda_numerics(device: torch.device, precision: str) -> None:
    """cuDNN autotuning (batch shapes are fixed within an epoch) and TF32 only where it was asked for.

    PyTorch runs float32 convolutions in TF32 by default; with precision float32 they stay float32,
    so a float32 evaluation on the GPU counts the same predictions as on the CPU.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = precision != "float32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16 (default on GPU), fp16 (with a GradScaler), or none."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compute_loss(
    model: torch.nn.Module, criterion: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str
) -> torch.Tensor:
    """The forward pass under autocast."""
    with autocast(images.device, precision):
        return criterion(model(images), labels)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None, loss_divisor: int = 1) -> None:
    """Accumulate gradients; `loss_divisor` averages over accumulated micro-batches."""
    scaled = loss / loss_divisor
    (scaler.scale(scaled) if scaler is not None else scaled).backward()


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    parameters,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    grad_norm: bool = False,
) -> torch.Tensor | None:
    """Clip (optionally), step, and clear the gradients. Returns the gradients' total L2 norm before
    clipping (unscaled, on the device: no sync) when clipping computes it or `grad_norm` asks for it."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = None
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    elif grad_norm:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train_step(model, optimizer, criterion, images, labels, precision: str = "bfloat16") -> torch.Tensor:
    """compute_loss + backward + optimizer_step, for benchmarks (no accumulation, no scaler)."""
    loss = compute_loss(model, criterion, images, labels, precision)
    backward(loss)
    optimizer_step(optimizer, model.parameters())
    return loss.detach()
