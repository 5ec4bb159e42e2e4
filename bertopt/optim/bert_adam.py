"""BertAdam: Google's BERT optimizer as a ``torch.optim.Optimizer``.

The class checks arguments, gathers tensors and state, clips by the global gradient
norm and dispatches to an implementation in ``_impl``; the math lives there.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from bertopt.optim import _impl
from bertopt.optim.clip import clip_coefficient, global_grad_norm

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

WEIGHT_DECAY_MODES = ("decoupled", "l2")


def check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Raise ValueError naming the argument and its allowed range."""
    if not isinstance(lr, Tensor) and not 0.0 <= lr:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")


def check_max_grad_norm(max_grad_norm) -> None:
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}")


def choose_implementation(params: list[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Like torch.optim: fused when asked for or when every tensor supports it."""
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True; pick one (fused is faster where it exists)")
    supported = torch.utils._foreach_utils._get_fused_kernels_supported_devices()
    fusable = all(
        p.device.type in supported and p.is_floating_point() and not isinstance(p, DTensor) for p in params
    )
    if fused:
        if not fusable:
            raise ValueError(
                "fused=True needs floating-point, non-DTensor parameters on one of "
                f"{supported}; use foreach=True or leave fused=None"
            )
        return "fused"
    if foreach:
        return "foreach"
    if foreach is None and fused is None:
        if fusable:
            return "fused"
        if all(p.device.type != "cpu" for p in params):
            return "foreach"
    return "reference"


class BertAdam(Optimizer):
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
            the fused kernel wherever torch has it.

    After each ``step()``, ``last_grad_norm`` holds the global gradient norm (before
    clipping). A step whose gradients contain inf or nan is skipped entirely (no
    parameter, moment or step count changes) and counted in ``skipped_steps``. The
    fused path leaves ``.grad`` as it found it for float32 CPU parameters (our native
    kernel); elsewhere torch's fused kernel leaves the clipped gradient there.
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
        check_hyperparameters(lr, betas, eps, weight_decay)
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        check_max_grad_norm(max_grad_norm)
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True; pick one (fused is faster where it exists)")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, weight_decay_mode=weight_decay_mode,
            foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.skipped_steps = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        if merged["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {merged['weight_decay_mode']!r}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Lets a state_dict saved by torch.optim.AdamW/Adam load here: fill in our keys.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bias_correction", False)
            group.setdefault("weight_decay_mode", "decoupled")
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
        self.__dict__.setdefault("max_grad_norm", None)
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("skipped_steps", 0)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["bertopt"] = {"max_grad_norm": self.max_grad_norm, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("bertopt")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "bertopt"})
        if extra is not None:
            self.max_grad_norm = extra["max_grad_norm"]
            self.skipped_steps = extra["skipped_steps"]

    def _gather(self, group: dict[str, Any], impl_hint: str):
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError("BertAdam does not support sparse gradients; use torch.optim.SparseAdam for those parameters")
            state = self.state[p]
            if len(state) == 0:
                # The fused kernels want the step on the parameter's device; the others on CPU.
                on_device = impl_hint == "fused"
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    # Runs eagerly inside torch.compile'd code (a graph break): the fused kernels mutate
    # their inputs in ways functionalization rejects, and the step is memory-bound anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gathered = []
        for group in self.param_groups:
            candidates = [p for p in group["params"] if p.grad is not None]
            impl = choose_implementation(candidates, group["foreach"], group["fused"]) if candidates else "reference"
            gathered.append((group, impl, self._gather(group, impl)))

        all_grads = [g for _, _, tensors in gathered for g in tensors[1]]
        total_norm = global_grad_norm(all_grads)
        self.last_grad_norm = total_norm
        if not torch.isfinite(total_norm):
            self.skipped_steps += 1  # like GradScaler: nothing changes, not even the step count
            return loss
        clip_coef = None if self.max_grad_norm is None else clip_coefficient(total_norm, self.max_grad_norm)

        for group, impl, (params, grads, exp_avgs, exp_avg_sqs, steps) in gathered:
            if impl == "fused":
                steps = [_step_on(s, p.device) for s, p in zip(steps, params)]
                for p, s in zip(params, steps):
                    self.state[p]["step"] = s
            beta1, beta2 = group["betas"]
            hyper = _impl.AdamHyper(
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
                decoupled=group["weight_decay_mode"] == "decoupled",
            )
            _impl.bert_adam(params, grads, exp_avgs, exp_avg_sqs, steps, hyper, clip_coef, impl)
        return loss


def _step_on(step: Tensor, device: torch.device) -> Tensor:
    """Move a step counter (e.g. loaded from a CPU checkpoint) to the kernel's device."""
    return step if step.device == device else step.to(device)
