"""transformers' ``AdamW`` (removed in transformers 4.50), the same update, faster.

``from transformers import AdamW`` no longer imports, and ``torch.optim.AdamW`` is a
different update; this class is the removed one: same signature, same per-group options,
same state (``step`` a Python int, ``exp_avg``, ``exp_avg_sq``), so its state_dicts load
both ways. Per parameter, at step ``t``::

    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    s = lr * sqrt(1 - b2**t) / (1 - b1**t)       # correct_bias=True; else s = lr
    p = p - s * m / (sqrt(v) + eps)               # eps added to sqrt(v), unscaled
    p = p - lr * wd * p                           # decay after the step, of the updated p

torch's AdamW instead divides ``sqrt(v)`` by ``sqrt(1 - b2**t)`` before adding eps, and
decays the parameter as it was before the step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from bertopt.compat import _engine
from bertopt.optim._adam import group_by_device_and_dtype
from bertopt.optim.base import check_foreach_fused, check_hyperparameters, choose_implementation


# transformers' checks (lr, betas, eps), plus weight_decay >= 0 (it ignored negative values): BertAdam's
check_adamw_hyperparameters = check_hyperparameters


class AdamW(Optimizer):
    """transformers' ``AdamW`` (<= 4.49): ``correct_bias=False`` is BERT's Adam.

    Args:
        params: parameters or param groups; every option below can be set per group.
        lr, betas, eps, weight_decay, correct_bias: as in transformers, same defaults.
        no_deprecation_warning: accepted and ignored (this class is not deprecated).
        foreach, fused: the implementation, as in ``torch.optim``. By default the fused
            one (bertopt's kernel, see ``bertopt.compat._engine``) wherever torch has fused
            kernels; ``foreach=False, fused=False`` is transformers' own loop, line by line.

    Unlike transformers' class, a negative ``weight_decay`` is an error (it was ignored).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        check_adamw_hyperparameters(lr, betas, eps, weight_decay)
        check_foreach_fused(foreach, fused)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_adamw_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        check_foreach_fused(merged.get("foreach"), merged.get("fused"))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state_dict of transformers' AdamW has no foreach/fused: fill them in.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.__setstate__({"state": self.state, "param_groups": self.param_groups})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs = _engine.gather(self, group, ("exp_avg", "exp_avg_sq"))
            if not params:
                continue
            for p in params:
                self.state[p]["step"] = int(self.state[p]["step"]) + 1  # an int, as transformers keeps it
            steps = [self.state[p]["step"] for p in params]
            impl = choose_implementation(params, group["foreach"], group["fused"])
            _UPDATES[impl](params, grads, exp_avgs, exp_avg_sqs, steps, group)
        return loss


def step_size(group: dict[str, Any], step: int) -> float:
    """transformers' step size at ``step`` (Python floats, in its order of operations)."""
    lr = float(group["lr"])
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adamw_reference(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    """transformers' loop, one tensor at a time, operation by operation."""
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), group["weight_decay"]
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt().add_(group["eps"])
        p.addcdiv_(m, denom, value=-step_size(group, t))
        if wd > 0.0:
            p.add_(p, alpha=-lr * wd)


def adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    """The same operations on lists of tensors (one device and dtype at a time)."""
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), group["weight_decay"]
    for chunk in group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
        p, g, m, v, t = chunk
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1.0 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(p, m, denom, [-step_size(group, s) for s in t])
        if wd > 0.0:
            decay_after_step(p, lr * wd)


def adamw_fused(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    """bertopt's fused kernel for the Adam step (``lr = s``, no decay), then the decay pass.

    The kernel does the step in one pass over p, g, m, v, one call per distinct step count
    (the tensors of a group usually share one). The decay ``p -= lr * wd * p`` is then a
    separate pass, transformers' own operation (``decay_after_step``): folding it into the kernel
    (``lr' = s (1 - lr wd)``, ``wd' = lr wd / lr'``) is the same value with one rounding of
    p instead of two, and measured against transformers it drifted by 1 float32 ulp on a
    quarter of the elements per step (8e-7 on |p| ~ 1 after 40 steps). Separate, the two
    differ only where the kernel's ``fma(-s, m / d, p)`` and transformers'
    ``p + (-s * m) / d`` round differently (0.4% of elements by 1 ulp, per step).
    """
    beta1, beta2 = group["betas"]
    by_step: dict[int, list[int]] = {}
    for i, t in enumerate(steps):
        by_step.setdefault(t, []).append(i)
    for t, idx in by_step.items():
        _engine.fused_update(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], lr=step_size(group, t), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=0.0, clip_coef=None)
    if group["weight_decay"] > 0.0:
        decay_after_step(params, float(group["lr"]) * group["weight_decay"])


def decay_after_step(params: list[Tensor], lr_wd: float) -> None:
    """transformers' ``p.add_(p, alpha=-lr * wd)`` on every tensor.

    A loop, not ``torch._foreach_add_(params, params, ...)``: with the output aliasing the
    input, torch's foreach (2.13, CPU) took 800 ms at bert-base where this loop takes 100 ms.
    """
    for p in params:
        p.add_(p, alpha=-lr_wd)


_UPDATES = {"reference": adamw_reference, "foreach": adamw_foreach, "fused": adamw_fused}

