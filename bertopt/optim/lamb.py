"""Lamb: the large-batch BERT optimizer (You et al. 2019, Algorithm 2) as a ``torch.optim.Optimizer``.

The class checks arguments, gathers tensors and state, clips by the global gradient
norm and dispatches to an implementation in ``_lamb``; the math lives there. It shares
BertAdam's argument checks, implementation choice, global norm and clip coefficient.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from torch import Tensor

from bertopt.optim import _lamb
from bertopt.optim._adam import AdamHyper
from bertopt.optim.base import GlobalClipOptimizer


def check_trust_options(trust_clip, always_adapt) -> None:
    """Raise ValueError naming the argument and what it accepts."""
    if trust_clip is not None:
        ok = isinstance(trust_clip, (tuple, list)) and len(trust_clip) == 2
        if ok:
            low, high = trust_clip
            ok = (isinstance(low, (int, float)) and isinstance(high, (int, float))
                  and not isinstance(low, bool) and not isinstance(high, bool)
                  and math.isfinite(low) and 0.0 <= low <= high and not math.isnan(high))
        if not ok:
            raise ValueError(
                f"trust_clip must be None or a pair (low, high) with 0 <= low <= high "
                f"(low finite, high may be inf), got {trust_clip!r}"
            )
    if not isinstance(always_adapt, bool):
        raise ValueError(f"always_adapt must be True or False, got {always_adapt!r}")


class Lamb(GlobalClipOptimizer):
    """LAMB: Adam with decoupled weight decay, rescaled per tensor by the trust ratio.

    For each parameter tensor: ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p`` and
    ``p -= lr * r * u`` with the trust ratio ``r = ||p|| / ||u||`` (1 when either norm
    is 0). Defaults reproduce NVIDIA's apex ``FusedLAMB`` as used for BERT pretraining;
    see ``docs/lamb.md`` for the settings that reproduce other implementations.

    Args:
        params: parameters or param groups (``torch.optim`` convention). Use
            :func:`bertopt.param_groups` to exclude LayerNorm and bias parameters from
            weight decay, as BERT does (which also excludes them from the trust ratio).
        lr, betas, eps, weight_decay: as in Adam/AdamW.
        bias_correction: divide the moments by ``1 - beta**t`` (the paper, apex, optax).
        max_grad_norm: clip the gradients of all groups together by their global norm,
            TensorFlow's way (``g * c / max(norm, c)``), before the moments. ``None``: off.
        trust_clip: ``(low, high)`` to clamp the trust ratio to (``(0.0, 1.0)`` is timm's
            ``trust_clip=True``, ``(0.01, 10.0)`` DeepSpeed's defaults); ``None``: no clamp.
        always_adapt: apply the trust ratio to every tensor. By default (apex's rule) it
            is applied only in groups whose ``weight_decay`` is not 0; the others take a
            plain Adam step (r = 1). Both are per-group options too.
        foreach, fused: choose the implementation like ``torch.optim.AdamW``; by default
            the fused one wherever torch has a fused Adam kernel.

    Sharded parameters (DTensors, e.g. from FSDP2's ``fully_shard``) are supported: the
    trust ratio and the global gradient norm use the norms of the whole tensors, summed
    across the mesh, not those of the local shards.

    After each ``step()``, ``last_grad_norm`` holds the global gradient norm (before
    clipping). A step whose gradients contain inf or nan is skipped entirely (no
    parameter, moment or step count changes) and counted in ``skipped_steps``.
    ``.grad`` is never written: after ``step()`` it holds what backward left there, on
    every implementation (the clip is folded into the update). The fused path on
    float32 CPU tensors allocates nothing; elsewhere it keeps one reused workspace of up
    to 16M elements (or the largest tensor) per device and dtype, and makes no host
    synchronisation (see BertAdam).
    """

    default_max_grad_norm = 1.0

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: tuple[float, float] | None = None,
        always_adapt: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        check_trust_options(trust_clip, always_adapt)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, trust_clip=None if trust_clip is None else tuple(trust_clip),
            always_adapt=always_adapt, foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults, max_grad_norm)
        self._workspaces: dict = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_trust_options(merged["trust_clip"], merged["always_adapt"])
        if param_group.get("trust_clip") is not None:
            param_group["trust_clip"] = tuple(param_group["trust_clip"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("trust_clip", None)
            group.setdefault("always_adapt", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        self.__dict__.setdefault("_workspaces", {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint stores the pair as a list
            if group.get("trust_clip") is not None:
                group["trust_clip"] = tuple(group["trust_clip"])

    def _update(self, group, impl, tensors, clip_coef, found_inf=None) -> None:
        tensors = self._steps_for(impl, tensors)
        beta1, beta2 = group["betas"]
        hyper = _lamb.LambHyper(
            adam=AdamHyper(
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], bias_correction=group["bias_correction"], decoupled=True,
            ),
            adapt=group["weight_decay"] != 0 or group["always_adapt"],
            trust_clip=group["trust_clip"],
        )
        _lamb.lamb(*tensors, hyper, clip_coef, impl, self._workspaces, found_inf)
