"""What BertAdam and Lamb share: one ``torch.optim.Optimizer`` shape around a different update.

- Adam state under torch's names (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints move
  between these optimizers and ``torch.optim.AdamW``;
- one global gradient norm over all groups: TensorFlow-style clipping before the update, and a
  step whose norm is inf/nan skipped whole and counted (``skipped_steps``), like GradScaler;
- ``max_grad_norm`` and ``skipped_steps`` carried in ``state_dict()`` under the key "bertopt".

A subclass says how to update one group (``_update``); the implementation of a group is
chosen here (``choose_implementation``), and so is where a new step counter lives (``_new_step``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from bertopt.optim._dtensor import DTensor, local_part
from bertopt.optim.clip import clip_coefficient, global_grad_norm
from bertopt.optim.native import build, kernels


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


def check_foreach_fused(foreach: bool | None, fused: bool | None) -> None:
    if foreach and fused:
        raise ValueError("foreach and fused cannot both be True; pick one (fused is faster where it exists)")


def choose_implementation(params: list[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Like torch.optim: fused when asked for or when every tensor supports it; foreach when
    asked for (or by default off CPU); else the reference's per-tensor loop. BertAdam, Lamb
    and the compat drop-ins all choose this way."""
    check_foreach_fused(foreach, fused)
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


class GlobalClipOptimizer(Optimizer):
    """Base of BertAdam and Lamb (see the module docstring)."""

    default_max_grad_norm: float | None = None  # for objects unpickled from older versions

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any],
                 max_grad_norm: float | None):
        check_hyperparameters(defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"])
        check_max_grad_norm(max_grad_norm)
        check_foreach_fused(defaults.get("foreach"), defaults.get("fused"))
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.skipped_steps = 0

    # Skipped steps are counted on the host, or on the device by the sync-free path
    # (read, and so synchronised, only when someone asks).
    @property
    def skipped_steps(self) -> int:
        skipped = self._skipped_steps
        if self._skipped_on_device is not None:
            skipped += int(self._skipped_on_device.item())
        return skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps, self._skipped_on_device = int(value), None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_hyperparameters(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("max_grad_norm", self.default_max_grad_norm)
        self.__dict__.setdefault("last_grad_norm", None)
        self.__dict__.setdefault("_skipped_steps", self.__dict__.pop("skipped_steps", 0))
        self.__dict__.setdefault("_skipped_on_device", None)

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

    # --- what a subclass defines ---

    def _implementation(self, group: dict[str, Any], params: list[Tensor]) -> str:
        # Judged on the local shards: the fast paths work on the piece of each DTensor this
        # process holds (norms that need whole tensors are reduced across processes).
        return choose_implementation([local_part(p) for p in params], group["foreach"], group["fused"])

    def _new_step(self, p: Tensor, impl: str) -> Tensor:
        # The fused kernels want the step on the parameter's device (a skipped step is then
        # undone there, without a host read); the others on CPU.
        return torch.zeros((), dtype=torch.float32, device=p.device if impl == "fused" else "cpu")

    def _update(self, group: dict[str, Any], impl: str, tensors: tuple[list[Tensor], ...], clip_coef: Tensor | None,
                found_inf: Tensor | None = None) -> None:
        """Update one group; ``found_inf`` (0-dim on the device, 1.0: skip) only on the sync-free path."""
        raise NotImplementedError

    def _steps_for(self, impl: str, tensors: tuple[list[Tensor], ...]) -> tuple[list[Tensor], ...]:
        """The fused kernels want step counters on the parameter's device: move any that are
        not (e.g. loaded from a CPU checkpoint) and keep the moved ones in the state."""
        if impl != "fused":
            return tensors
        params, *rest, steps = tensors
        moved = []
        for p, s in zip(params, steps):
            if s.device != p.device:
                s = s.to(p.device)
                self.state[p]["step"] = s
            moved.append(s)
        return (params, *rest, moved)

    @staticmethod
    def _sync_free(gathered) -> bool:
        """True if every tensor of the step goes to torch's fused kernels: then the skip
        decision stays on the device. (The native CPU kernel reads the norm on the host.)"""
        if not gathered or any(impl != "fused" for _, impl, _ in gathered):
            return False
        if build.library() is None:
            return True
        return not any(kernels.eligible([local_part(p)]) for _, _, tensors in gathered for p in tensors[0])

    # --- the shared step ---

    def _gather(self, group: dict[str, Any], impl: str):
        """Parameters with gradients and their state, creating the state on first use.

        (Not named ``_init_group``: torch.compile special-cases that name in optimizers.)
        """
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients; "
                                 "use torch.optim.SparseAdam for those parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = self._new_step(p, impl)
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
            with_grad = [p for p in group["params"] if p.grad is not None]
            impl = self._implementation(group, with_grad) if with_grad else "reference"
            gathered.append((group, impl, self._gather(group, impl)))

        total_norm = global_grad_norm([g for _, _, tensors in gathered for g in tensors[1]])
        self.last_grad_norm = total_norm
        clip_coef = None if self.max_grad_norm is None else clip_coefficient(total_norm, self.max_grad_norm)
        if self._sync_free(gathered):
            # No host read: the kernels skip the step themselves when found_inf is 1.
            found_inf = (~torch.isfinite(total_norm)).float()
            previous = self._skipped_on_device
            self._skipped_on_device = found_inf if previous is None else previous + found_inf.to(previous.device)
            for group, impl, tensors in gathered:
                self._update(group, impl, tensors, clip_coef, found_inf)
            return loss
        if not torch.isfinite(total_norm):
            self._skipped_steps += 1  # like GradScaler: nothing changes, not even the step count
            return loss
        for group, impl, tensors in gathered:
            self._update(group, impl, tensors, clip_coef)
        return loss
