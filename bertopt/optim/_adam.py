"""The math of BERT's Adam, in three implementations that must agree.

``reference``  one tensor at a time, the equations line by line, computed in float32.
               Every fast path is tested against it.
``foreach``    the same equations on lists of tensors (``torch._foreach_*``), with
               list-sized temporaries (16-bit tensors go through float32 copies).
``fused``      one pass that reads p, g, m, v and writes p, m, v once, with no
               temporaries. For float32 CPU tensors it is our own C kernel
               (``native``, ``csrc/adam.c``: the reference's operations, 32 bytes per
               parameter with the norm). Elsewhere it is torch's fused Adam/AdamW
               kernels; two facts make them compute BERT's update: the global-norm
               clip coefficient enters as ``grad_scale`` (the kernel divides the
               gradient by it), and bias correction is switched off by handing the
               kernel a step count so large that ``beta**step`` is 0, so
               ``1 - beta**step`` is exactly 1. That path makes no host
               synchronisation: a non-finite norm reaches the kernel as ``found_inf``.

``.grad`` after ``step()`` is what it was before, on every path (BertAdam's and Lamb's):
the clip coefficient is folded into the update and gradients are only read. The native
kernels honour this at no cost; torch's fused kernel, which stores the scaled gradient
back into what it is handed, gets copies (``bert_adam_fused_torch``).

The update, for one parameter ``p`` with gradient ``g`` (Google's
``AdamWeightDecayOptimizer`` when ``bias_correction=False, decoupled=True``)::

    g = g * clip_coef                              # global-norm clip (optional)
    g = g + wd * p                                 # only in "l2" mode: Adam + L2
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m, v                            # or m/(1-b1^t), v/(1-b2^t)
    u = m_hat / (sqrt(v_hat) + eps)
    u = u + wd * p                                 # only in "decoupled" mode
    p = p - lr * u
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bertopt.optim._dtensor import local_part
from bertopt.optim.native import build, kernels

# beta**NO_BIAS_CORRECTION_STEP underflows to exactly 0 for any beta < 1 that makes
# sense (0.999**2**30 = 0.0 in float64), so the fused kernels' bias corrections are 1.
NO_BIAS_CORRECTION_STEP = float(2**30)


@dataclass(frozen=True)
class AdamHyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    bias_correction: bool
    decoupled: bool  # True: decay added to the update (BERT, AdamW); False: L2 on the gradient


def bias_correction_factors(steps: list[Tensor], h: AdamHyper) -> tuple[list[float], list[float]]:
    """Per tensor ``(1 - beta1**t, 1 - beta2**t)`` at its step count ``t`` (Python floats)."""
    ts = [s.item() for s in steps]
    return [1 - h.beta1**t for t in ts], [1 - h.beta2**t for t in ts]


def adam_direction(g: Tensor, m: Tensor, v: Tensor, step: Tensor, h: AdamHyper) -> Tensor:
    """Update the float32 moments in place and return ``m_hat / (sqrt(v_hat) + eps)``.

    The part of the reference shared by BertAdam and LAMB."""
    m.mul_(h.beta1).add_(g, alpha=1 - h.beta1)
    v.mul_(h.beta2).addcmul_(g, g, value=1 - h.beta2)
    m_hat, v_hat = m, v
    if h.bias_correction:
        t = step.item()
        m_hat = m / (1 - h.beta1**t)
        v_hat = v / (1 - h.beta2**t)
    return m_hat / (v_hat.sqrt() + h.eps)


def one_tensor_at_a_time(params, grads, exp_avgs, exp_avg_sqs, steps, clip_coef: Tensor | None):
    """The references' loop: count the step, yield float32 ``p, g * clip_coef, m, v, step``
    for one tensor, and after the caller's update store p, m, v back (16-bit tensors)."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step += 1
        p32, m32, v32 = p.float(), m.float(), v.float()  # no copies for float32 tensors
        g = g.float()
        if clip_coef is not None:
            g = g * clip_coef
        yield p32, g, m32, v32, step
        for low, high in ((p, p32), (m, m32), (v, v32)):
            if low is not high:
                low.copy_(high)


def bert_adam_reference(params, grads, exp_avgs, exp_avg_sqs, steps, h: AdamHyper, clip_coef: Tensor | None):
    """One tensor at a time, exactly the equations in the module docstring (float32 math)."""
    for p32, g, m32, v32, step in one_tensor_at_a_time(params, grads, exp_avgs, exp_avg_sqs, steps, clip_coef):
        if h.weight_decay != 0 and not h.decoupled:
            g = g + h.weight_decay * p32
        update = adam_direction(g, m32, v32, step, h)
        if h.weight_decay != 0 and h.decoupled:
            update = update + h.weight_decay * p32
        p32.add_(update, alpha=-h.lr)


def in_float32(fn, params, grads, exp_avgs, exp_avg_sqs, *args) -> None:
    """Run the foreach step ``fn`` on float32 copies of 16-bit tensors, then store p, m, v back."""
    wide = [[t.float() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]
    fn(*wide, *args)
    for narrow, wide_ts in ((params, wide[0]), (exp_avgs, wide[2]), (exp_avg_sqs, wide[3])):
        torch._foreach_copy_(narrow, wide_ts)


def foreach_direction(grads, exp_avgs, exp_avg_sqs, steps, h: AdamHyper) -> list[Tensor]:
    """``adam_direction`` on lists: update the moments in place, return new tensors
    ``m_hat / (sqrt(v_hat) + eps)`` (shared by BertAdam's and LAMB's foreach paths)."""
    torch._foreach_mul_(exp_avgs, h.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - h.beta1)
    torch._foreach_mul_(exp_avg_sqs, h.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - h.beta2)
    if not h.bias_correction:
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, h.eps)
        return torch._foreach_div(exp_avgs, denom)
    bc1, bc2 = bias_correction_factors(steps, h)
    m_hat = torch._foreach_div(exp_avgs, bc1)
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, h.eps)
    torch._foreach_div_(m_hat, denom)  # a temporary already: divided in place
    return m_hat


def bert_adam_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, h: AdamHyper, clip_coef: Tensor | None):
    """The reference on lists of tensors of one device and dtype.

    16-bit tensors are updated through float32 copies (as the fused kernels and the
    reference do): in fp16, (1 - b2) * g * g underflows and m / (sqrt(v) + eps) explodes.
    """
    if params[0].dtype in (torch.float16, torch.bfloat16):
        in_float32(bert_adam_foreach, params, grads, exp_avgs, exp_avg_sqs, steps, h, clip_coef)
        return
    torch._foreach_add_(steps, 1)
    if clip_coef is not None:
        grads = torch._foreach_mul(grads, clip_coef.to(grads[0].device))
    if h.weight_decay != 0 and not h.decoupled:
        grads = torch._foreach_add(grads, params, alpha=h.weight_decay)
    update = foreach_direction(grads, exp_avgs, exp_avg_sqs, steps, h)
    if h.weight_decay != 0 and h.decoupled:
        torch._foreach_add_(update, params, alpha=h.weight_decay)
    torch._foreach_add_(params, update, alpha=-h.lr)


def bert_adam_fused(params, grads, exp_avgs, exp_avg_sqs, steps, h: AdamHyper, clip_coef: Tensor | None,
                    found_inf: Tensor | None = None):
    """The fastest one-pass kernel for these tensors.

    float32 CPU tensors: our own kernel (``native.kernels.adam_step``), which reads p, g,
    m, v and writes p, m, v once and computes the reference's float32 operations.
    Anything else (other dtypes, devices, layouts, or no C compiler): torch's fused
    Adam/AdamW kernel (``bert_adam_fused_torch``). ``found_inf`` (a 0-dim tensor on the
    device, 1.0 to skip) is only given on the sync-free path, which never reaches the
    native kernel (``base.GlobalClipOptimizer.step``).
    """
    lib = build.library() if kernels.eligible(params, grads, exp_avgs, exp_avg_sqs) else None
    if lib is None:
        bert_adam_fused_torch(params, grads, exp_avgs, exp_avg_sqs, steps, h, clip_coef, found_inf)
        return
    with kernels.counting_the_step(steps):
        bias_corrections = bias_correction_factors(steps, h) if h.bias_correction else None
        kernels.adam_step(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h,
                          None if clip_coef is None else clip_coef.item())


# The torch fused path copies at most this many gradient elements at a time (see below).
GRAD_COPY_NUMEL = 1 << 24


def torch_fused_kernel_steps(steps: list[Tensor], h: AdamHyper, found_inf: Tensor | None) -> list[Tensor]:
    """Count the step (not if ``found_inf`` is 1: on the device, no host read) and return
    the step tensors torch's fused kernels should see: ours, or with no bias correction a
    count so large that ``1 - beta**t`` is exactly 1."""
    torch._foreach_add_(steps, 1)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf.to(s.device) for s in steps])
    if h.bias_correction:
        return steps
    device = steps[0].device
    return [torch.full((), NO_BIAS_CORRECTION_STEP, dtype=torch.float32, device=device)] * len(steps)


def bert_adam_fused_torch(params, grads, exp_avgs, exp_avg_sqs, steps, h: AdamHyper, clip_coef: Tensor | None,
                          found_inf: Tensor | None = None):
    """torch's fused Adam/AdamW kernel, steered to BERT's update (see module docstring).

    The clip coefficient and ``found_inf`` stay on the device (``grad_scale = 1/clip``):
    no host synchronisation. Given ``grad_scale``, torch's kernel stores the scaled
    gradient back into the gradient it was handed; to keep ``.grad`` unchanged (the
    contract of every path) it is handed copies, ``GRAD_COPY_NUMEL`` elements at a time.
    """
    device = params[0].device
    kernel_steps = torch_fused_kernel_steps(steps, h, found_inf)
    grad_scale = None if clip_coef is None else (1.0 / clip_coef).to(device)
    found_inf = None if found_inf is None else found_inf.to(device)
    # AdamW's kernel decays as p *= 1 - lr*wd before p -= lr*m/(sqrt(v)+eps): the same
    # p - lr*(u + wd*p) as Google's, both using p from before the step.
    kernel = torch._fused_adamw_ if h.decoupled else torch._fused_adam_
    slices = consecutive_runs(params, GRAD_COPY_NUMEL) if grad_scale is not None else [(0, len(params))]
    for a, b in slices:
        kernel_grads = grads[a:b] if grad_scale is None else [g.clone() for g in grads[a:b]]
        kernel(
            params[a:b], kernel_grads, exp_avgs[a:b], exp_avg_sqs[a:b], [], kernel_steps[a:b],
            lr=h.lr, beta1=h.beta1, beta2=h.beta2, weight_decay=h.weight_decay, eps=h.eps,
            amsgrad=False, maximize=False, grad_scale=grad_scale, found_inf=found_inf,
        )


IMPLEMENTATIONS = {
    "reference": bert_adam_reference,
    "foreach": bert_adam_foreach,
    "fused": bert_adam_fused,
}


# --- splitting the lists the foreach and fused paths take (BertAdam's, LAMB's, the drop-ins') ---


def group_by_device_and_dtype(*tensor_lists):
    """Split parallel tensor lists into chunks whose first list's tensors share device and dtype
    (the foreach and fused kernels take one device and dtype per call)."""
    buckets: dict[tuple, list[list]] = {}
    for items in zip(*tensor_lists):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, [[] for _ in tensor_lists])
        for lst, item in zip(bucket, items):
            lst.append(item)
    return list(buckets.values())


def consecutive_runs(tensors: list[Tensor], max_numel: int):
    """Index ranges ``(start, end)`` of consecutive tensors of at most ``max_numel`` elements
    in all (or one larger tensor): the gradient copies of torch's fused path, LAMB's buckets."""
    start, total = 0, 0
    for i, t in enumerate(tensors):
        if i > start and total + t.numel() > max_numel:
            yield start, i
            start, total = i, 0
        total += t.numel()
    if start < len(tensors):
        yield start, len(tensors)


def bert_adam(params, grads, exp_avgs, exp_avg_sqs, steps, h: AdamHyper, clip_coef: Tensor | None, impl: str,
              found_inf: Tensor | None = None):
    """Apply one BERT Adam update with the chosen implementation. ``found_inf``: see
    ``bert_adam_fused`` (only the fused implementation takes it)."""
    if not params:
        return
    fn = IMPLEMENTATIONS[impl]
    if impl == "reference":
        fn(params, grads, exp_avgs, exp_avg_sqs, steps, h, clip_coef)
        return
    extra = {} if found_inf is None else {"found_inf": found_inf}
    local = [[local_part(t) for t in tensors] for tensors in (params, grads, exp_avgs, exp_avg_sqs)]
    for chunk in group_by_device_and_dtype(*local, steps):
        fn(*chunk, h, clip_coef, **extra)
