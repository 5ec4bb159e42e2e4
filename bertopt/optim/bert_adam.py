"""BertAdam: Google's BERT optimizer as a ``torch.optim.Optimizer``.

The class checks arguments, gathers tensors and state, clips by the global gradient
norm and dispatches to an implementation in ``_adam``; the math lives there.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from bertopt.optim import _adam
from bertopt.optim.base import GlobalClipOptimizer

WEIGHT_DECAY_MODES = ("decoupled", "l2")


class BertAdam(GlobalClipOptimizer):
    """Adam as BERT was trained with it (google-research/bert ``optimization.py``).

    Defaults reproduce Google's ``AdamWeightDecayOptimizer``: no bias correction,
    ``eps`` added outside the square root, weight decay added to the update (decoupled)
    and multiplied by the learning rate. Use :func:`bertopt.param_groups` to exclude
    LayerNorm and bias parameters from decay, as BERT does.

    Args:
        params: parameters or param groups (``torch.optim`` convention).
        lr, betas, eps, weight_decay: as in Adam; BERT's values are the defaults.
        bias_correction: ``True`` gives torch's AdamW update.
        weight_decay_mode: ``"decoupled"`` (BERT, AdamW) or ``"l2"`` (decay added to the
            gradient before the moments, i.e. L2 regularisation under Adam).
        max_grad_norm: clip the gradients of all groups together by their global norm,
            TensorFlow's way (``g * c / max(norm, c)``), before the update. ``None``: off.
        foreach, fused: choose the implementation like ``torch.optim.AdamW``; by default
            the fused kernel wherever torch has it. DTensor parameters (FSDP2) run it on
            their local shards; the global norm is that of the whole gradients.

    After each ``step()``, ``last_grad_norm`` holds the global gradient norm (before
    clipping). A step whose gradients contain inf or nan is skipped entirely (no
    parameter, moment or step count changes) and counted in ``skipped_steps``.
    ``.grad`` is never written: after ``step()`` it holds what backward left there, on
    every implementation (the clip is folded into the update). When every group runs on
    torch's fused kernel (GPUs; CPU without a compiler or in 16 bits), the step makes no
    host synchronisation: the norm, the clip coefficient and the skip decision stay on
    the device (``found_inf``), and ``skipped_steps`` is read from there when asked for.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = False,
        weight_decay_mode: str = "decoupled",
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
    ):
        _check_mode(weight_decay_mode)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, weight_decay_mode=weight_decay_mode,
            foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults, max_grad_norm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_mode(param_group.get("weight_decay_mode", self.defaults["weight_decay_mode"]))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Lets a state_dict saved by torch.optim.AdamW/Adam load here: fill in our keys.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", False)
            group.setdefault("weight_decay_mode", "decoupled")
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def _update(self, group, impl, tensors, clip_coef, found_inf=None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = self._steps_for(impl, tensors)
        beta1, beta2 = group["betas"]
        hyper = _adam.AdamHyper(
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
            decoupled=group["weight_decay_mode"] == "decoupled",
        )
        _adam.bert_adam(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, clip_coef, impl, found_inf)


def _check_mode(weight_decay_mode: str) -> None:
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
