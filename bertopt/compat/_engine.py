"""What the drop-ins share: gathering tensors and state, and steering bertopt's fused kernel (they
choose an implementation as BertAdam and Lamb do, ``bertopt.optim.base.choose_implementation``).

bertopt's fused update (the native C kernel on float32 CPU tensors, torch's fused AdamW
kernel elsewhere) computes, per element and with no bias correction::

    g = g * c                                     # c: one clip coefficient per call
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (sqrt(v) + eps) + wd * p)

Both originals are this update with other scalars, which is why their fast paths are
that kernel called with the right ``lr``, ``wd`` and ``c`` (``fused_update``):

* pytorch-pretrained-bert's BertAdam is it exactly, with ``lr`` its scheduled LR and
  ``c`` each tensor's own clip coefficient: one call per distinct coefficient.
* transformers' AdamW is it with ``wd = 0`` and ``lr = s = lr * sqrt(1 - b2^t) / (1 - b1^t)``
  (or ``lr``), followed by its decay of the updated parameter, ``p -= lr * wd * p``, as a
  separate pass (see ``adamw.adamw_fused`` for why not folded into the kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

# The internals of bertopt.optim used here: its functional Adam entry point, and whether
# its native kernel (rather than torch's fused one) will take a list of tensors.
from bertopt.optim._adam import AdamHyper, bert_adam as _bert_adam
from bertopt.optim.native import build, kernels


def gather(optimizer, group: dict, moments: tuple[str, str]) -> tuple[list[Tensor], ...]:
    """The parameters of ``group`` that have gradients, their gradients and their two moments
    (state keys ``moments``), creating the moments and a step count of 0 on first use, as the
    originals do; their error for sparse gradients."""
    params, grads, firsts, seconds = [], [], [], []
    first, second = moments
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
        state = optimizer.state[p]
        if len(state) == 0:
            state["step"] = 0
            state[first] = torch.zeros_like(p)
            state[second] = torch.zeros_like(p)
        params.append(p)
        grads.append(p.grad)
        firsts.append(state[first])
        seconds.append(state[second])
    return params, grads, firsts, seconds


def native_kernel_takes(*tensor_lists: list[Tensor]) -> bool:
    """Whether ``fused_update`` runs bertopt's native kernel on these tensors.

    Elsewhere it runs torch's fused AdamW kernel, which decays ``p *= 1 - lr * wd`` before
    the step: one more rounding of p per step than ``p - lr * (u + wd * p)``, measured at
    1.1e-6 against pytorch-pretrained-bert after 40 steps, so BertAdam with decay does not
    use it (``bert_adam.bert_adam_fused``).
    """
    return kernels.eligible(*tensor_lists) and build.library() is not None


_SCRATCH_STEP = torch.zeros((), dtype=torch.float32)


def fused_update(params, grads, exp_avgs, exp_avg_sqs, *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, clip_coef: float | None) -> None:
    """The kernel of the module docstring on these tensors (bias correction off).

    The step counts the kernel would advance are the drop-ins' own (plain ints, as the
    originals keep them); it is handed a scratch counter, whose value it does not use
    when bias correction is off.
    """
    if not params:
        return
    hyper = AdamHyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      bias_correction=False, decoupled=True)
    coef = None if clip_coef is None else torch.tensor(clip_coef, dtype=torch.float32)
    _bert_adam(params, grads, exp_avgs, exp_avg_sqs, [_SCRATCH_STEP] * len(params), hyper, coef, "fused")

