"""pytorch-pretrained-bert 0.6.2's ``BertAdam``: the same update, faster.

Many published BERT fine-tuning results used it. It differs from Google's optimizer
(``bertopt.BertAdam``) in two ways, both kept here:

* each parameter tensor is clipped by **its own** norm (``clip_grad_norm_(p, max_grad_norm)``,
  torch's ``c / (norm + 1e-6)`` clamped at 1), not all gradients by their global norm;
* the LR schedule runs **inside** the optimizer, from each parameter's own step count
  (``lr * schedule.get_lr(step)``, step 0 for the first update), so no LR scheduler is used.

Per parameter, with no bias correction and the decay added to the update::

    g = g * min(1, max_grad_norm / (||g|| + 1e-6))        # if max_grad_norm > 0
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * schedule(step) * (m / (sqrt(v) + e) + weight_decay * p)

State keys are 0.6.2's (``step`` an int, ``next_m``, ``next_v``), so state_dicts load both
ways; a 0.6.2 schedule object found in a loaded state_dict becomes ours.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import required

from bertopt.compat import _engine
from bertopt.compat.ppb_schedules import SCHEDULES, from_original
from bertopt.optim._adam import group_by_device_and_dtype
from bertopt.optim.base import check_foreach_fused, choose_implementation

logger = logging.getLogger(__name__)


def check_bert_adam_hyperparameters(lr, b1, b2, e, weight_decay) -> None:
    """0.6.2's checks (lr, b1, b2, e), plus weight_decay >= 0 (0.6.2 ignored negative values)."""
    if lr is not required and not isinstance(lr, Tensor) and not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    if not e >= 0.0:
        raise ValueError(f"e (Adam's epsilon) must be >= 0, got {e}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0 (pytorch-pretrained-bert silently ignored negative values), "
                         f"got {weight_decay}")


def _is_schedule_object(schedule) -> bool:
    return callable(getattr(schedule, "get_lr", None))


def make_schedule(schedule, warmup, t_total):
    """A schedule object from BertAdam's arguments, as 0.6.2 builds it."""
    if _is_schedule_object(schedule):
        if warmup != -1 or t_total != -1:
            logger.warning("warmup and t_total of BertAdam are ignored when schedule is an object "
                           "(%r): set them on the schedule", schedule)
        return from_original(schedule)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)} or a schedule object "
                         f"(bertopt.compat.WarmupLinearSchedule(...), ...), got {schedule!r}")
    return SCHEDULES[schedule](warmup=warmup, t_total=t_total)


class BertAdam(Optimizer):
    """pytorch-pretrained-bert 0.6.2's ``BertAdam`` (see the module docstring).

    Args:
        params: parameters or param groups; ``lr``, ``schedule``, ``b1``, ``b2``, ``e``,
            ``weight_decay`` and ``max_grad_norm`` can be set per group.
        lr: the base LR (required, here or in every group).
        warmup: fraction of ``t_total`` for linear warmup, in [0, 1); -1: none.
        t_total: optimizer steps the schedule spans; -1: no schedule (multiplier 1).
        schedule: "warmup_linear" (default), "warmup_cosine", "warmup_constant", "none",
            None, or a schedule object (``bertopt.compat.WarmupCosineWithHardRestartsSchedule(...)``,
            or 0.6.2's own).
        b1, b2, e: Adam's betas and epsilon (added to ``sqrt(v)``).
        weight_decay: added to the update as ``weight_decay * p`` (0: none).
        max_grad_norm: clip each tensor's gradient to this norm; <= 0: no clipping.
        foreach, fused: the implementation, as in ``torch.optim``; by default the fused
            one (bertopt's kernel, one call per distinct clip coefficient) wherever torch
            has fused kernels. ``foreach=False, fused=False`` is 0.6.2's loop.

    Differences from 0.6.2: ``.grad`` is not rewritten with the clipped gradient (0.6.2
    clipped it in place; torch's fused kernel, used off CPU, still does); a negative
    ``weight_decay`` is an error (it was ignored); unknown keyword arguments warn (they
    were ignored silently).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = required,
        warmup: float = -1,
        t_total: float = -1,
        schedule: Any = "warmup_linear",
        b1: float = 0.9,
        b2: float = 0.999,
        e: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        **kwargs: Any,
    ):
        if kwargs:
            warnings.warn(f"BertAdam ignores the keyword arguments {sorted(kwargs)} "
                          "(as pytorch-pretrained-bert did)", stacklevel=2)
        check_bert_adam_hyperparameters(lr, b1, b2, e, weight_decay)
        check_foreach_fused(foreach, fused)
        schedule = make_schedule(schedule, warmup, t_total)
        defaults = dict(lr=lr, schedule=schedule, b1=b1, b2=b2, e=e, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_bert_adam_hyperparameters(merged["lr"], merged["b1"], merged["b2"], merged["e"], merged["weight_decay"])
        check_foreach_fused(merged.get("foreach"), merged.get("fused"))
        if "schedule" in param_group and not _is_schedule_object(param_group["schedule"]):
            raise ValueError(f"a param group's schedule must be a schedule object, got {param_group['schedule']!r}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group["schedule"] = from_original(group["schedule"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Loads 0.6.2's state_dicts too: its schedule objects are replaced by ours.
        super().load_state_dict(state_dict)
        self.__setstate__({"state": self.state, "param_groups": self.param_groups})

    def get_lr(self) -> list[float]:
        """0.6.2's ``get_lr()``: each parameter's scheduled LR of its next update ([0] before the first)."""
        lr = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    return [0]
                lr.append(group["lr"] * group["schedule"].get_lr(state["step"]))
        return lr

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, next_ms, next_vs = _engine.gather(self, group, ("next_m", "next_v"))
            if not params:
                continue
            steps = [int(self.state[p]["step"]) for p in params]
            impl = choose_implementation(params, group["foreach"], group["fused"])
            _UPDATES[impl](params, grads, next_ms, next_vs, steps, group)
            for p in params:
                self.state[p]["step"] = int(self.state[p]["step"]) + 1
        return loss


def clip_coefficients(grads: list[Tensor], max_grad_norm: float) -> list[float]:
    """Each tensor's ``clip_grad_norm_`` coefficient ``min(1, c / (||g|| + 1e-6))``, in float32 as torch."""
    norms = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0).tolist()


def _scheduled_lrs(group, steps: list[int]) -> dict[int, float]:
    """The LR of each distinct step: ``lr * schedule.get_lr(step)``, evaluated once per step value."""
    return {t: group["lr"] * group["schedule"].get_lr(t) for t in dict.fromkeys(steps)}


def bert_adam_reference(params, grads, next_ms, next_vs, steps, group) -> None:
    """0.6.2's loop, one tensor at a time (its clip computed as torch's clip_grad_norm_ does)."""
    beta1, beta2, wd = group["b1"], group["b2"], group["weight_decay"]
    for p, g, m, v, t in zip(params, grads, next_ms, next_vs, steps):
        if group["max_grad_norm"] > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)]))
            coef = (group["max_grad_norm"] / (norm + 1e-6)).clamp(max=1.0)
            g = g * coef
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = m / (v.sqrt() + group["e"])
        if wd > 0.0:
            update += wd * p
        lr_scheduled = group["lr"] * group["schedule"].get_lr(t)
        p.add_(-(lr_scheduled * update))


def bert_adam_foreach(params, grads, next_ms, next_vs, steps, group) -> None:
    """The same operations on lists of tensors."""
    beta1, beta2, wd = group["b1"], group["b2"], group["weight_decay"]
    lrs = _scheduled_lrs(group, steps)
    for p, g, m, v, t in group_by_device_and_dtype(params, grads, next_ms, next_vs, steps):
        if group["max_grad_norm"] > 0:
            g = torch._foreach_mul(g, clip_coefficients(g, group["max_grad_norm"]))
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, group["e"])
        update = torch._foreach_div(m, denom)
        if wd > 0.0:
            torch._foreach_add_(update, torch._foreach_mul(p, wd))
        torch._foreach_mul_(update, [lrs[s] for s in t])
        torch._foreach_sub_(p, update)


def bert_adam_fused(params, grads, next_ms, next_vs, steps, group) -> None:
    """bertopt's fused kernel, once per distinct (step, clip coefficient); unclipped tensors share a call.

    With decay, only bertopt's native kernel computes 0.6.2's ``p - lr * (u + wd * p)``
    closely enough; where torch's fused kernel would run instead, the foreach path does.
    """
    if group["weight_decay"] > 0.0 and not _engine.native_kernel_takes(params, grads, next_ms, next_vs):
        bert_adam_foreach(params, grads, next_ms, next_vs, steps, group)
        return
    lrs = _scheduled_lrs(group, steps)
    coefs = (clip_coefficients(grads, group["max_grad_norm"]) if group["max_grad_norm"] > 0
             else [1.0] * len(params))
    calls: dict[tuple, list[int]] = {}
    for i, (t, c) in enumerate(zip(steps, coefs)):
        calls.setdefault((t, None if c >= 1.0 else c), []).append(i)
    wd = group["weight_decay"] if group["weight_decay"] > 0.0 else 0.0
    for (t, coef), idx in calls.items():
        _engine.fused_update(
            [params[i] for i in idx], [grads[i] for i in idx], [next_ms[i] for i in idx],
            [next_vs[i] for i in idx], lr=float(lrs[t]), beta1=group["b1"], beta2=group["b2"], eps=group["e"],
            weight_decay=wd, clip_coef=coef)


_UPDATES = {"reference": bert_adam_reference, "foreach": bert_adam_foreach, "fused": bert_adam_fused}

