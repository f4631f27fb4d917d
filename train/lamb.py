"""LAMB (You et al., "Large Batch Optimization for Deep Learning", 2019), as timm's `Lamb` runs it.

Written here because torch.optim has no LAMB; timm has one (the optimizer of its "ResNet strikes
back" recipes), but it would bring timm and huggingface_hub into the runtime for some forty lines.
The tests compare this one with timm's step for step.

Per parameter tensor: Adam's bias-corrected update, plus `weight_decay * w` (decay inside the
update, not decoupled), scaled by the trust ratio ||w|| / ||update|| (1 where either norm is 0),
so each layer moves by `lr * ||w||`. As in timm's default, tensors without weight decay (norms and
biases under `optim.no_decay_bn_bias`) take the plain Adam update. timm's `Lamb` also clips the
global gradient norm at 1.0 by default; here that is `optim.grad_clip`, applied before the step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class Lamb(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: invalid lr {lr}, betas {betas}, eps {eps} or weight_decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            steps = {self.state[p]["step"] for p in params}
            if len(steps) > 1:
                raise RuntimeError("Lamb: the tensors of one parameter group have taken different numbers of steps")
            self._update(group, params, steps.pop())
        return loss

    def _update(self, group: dict, params: list[torch.Tensor], step: int) -> None:
        """One step of a group, with the multi-tensor (foreach) kernels: a few launches per group
        instead of a dozen per tensor."""
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, math.sqrt(1.0 - beta2**step))
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, 1.0 - beta1**step)
        torch._foreach_div_(updates, denominators)

        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])
            weight_norms = torch.stack(torch._foreach_norm(params))
            update_norms = torch.stack(torch._foreach_norm(updates))
            usable = (weight_norms > 0) & (update_norms > 0)
            trust_ratios = torch.where(usable, weight_norms / update_norms, torch.ones_like(weight_norms))
            torch._foreach_mul_(updates, list(trust_ratios.unbind()))
        torch._foreach_add_(params, updates, alpha=-group["lr"])
