"""The math of LAMB, in three implementations that must agree.

LAMB is Algorithm 2 of You et al. 2019, "Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes": Adam's update, plus decoupled weight decay, rescaled per
parameter tensor by the *trust ratio* ``||p|| / ||u||``. For one tensor ``p`` with
gradient ``g``::

    g = g * clip_coef                          # global-norm clip (optional, all tensors)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1^t), v / (1 - b2^t)     # or m, v without bias correction
    u = m_hat / (sqrt(v_hat) + eps) + wd * p
    r = ||p|| / ||u||                          # 1 if either norm is 0; clamped to trust_clip
                                               # r = 1 for tensors that are not adapted
    p = p - lr * r * u

Norms are those of the *whole* tensor. A parameter sharded as a DTensor (FSDP2's
``fully_shard``) holds only a piece of ``p`` and ``u`` on each process; the norm of the
piece is not the norm of the tensor, so the sums of squares are added across the mesh
(``clip.whole_sums_of_squares``) before the ratio is formed.

``reference``  one tensor at a time, the equations line by line, in float32. DTensors go
               through DTensor's own ops (its norm is reduced over the mesh by
               ``full_tensor``), so it doubles as an independent check of the others.
``foreach``    the same equations on lists of local shards (``torch._foreach_*``), with
               list-sized temporaries (16-bit tensors go through float32 copies); all
               trust-ratio norms of a bucket of tensors in one reduction.
``fused``      float32 CPU tensors: our C kernel (``csrc/lamb.c``), two passes over
               memory (moments and the norms; then u again from p, m, v and
               p -= lr*r*u), no temporaries; unsharded tensors a cache-sized segment at
               a time. Elsewhere: torch's fused Adam kernel does the moment update and
               writes ``-u`` into a reused workspace (run with lr = 1 on a buffer that
               holds ``-wd * p``: ``-wd*p - m_hat/(sqrt(v_hat)+eps) = -u``); then the
               norms, then ``p += lr * r * (-u)``; memory: one workspace the size of one
               bucket (``BUCKET_NUMEL`` elements, or the largest tensor), reused every
               step, and copies of a bucket's gradients when clipping (torch's kernel
               would store the scaled gradient back). Either way, tensors that are not
               adapted (weight decay 0 and not ``always_adapt``) take one plain Adam
               pass, since for them r = 1.

``.grad`` after ``step()`` is what it was before, on every path (as for BertAdam: see
``_adam``).

The fast paths run bucket by bucket (consecutive tensors totalling at most
``BUCKET_NUMEL`` elements of the *whole* tensors, so every process forms the same
buckets and issues the same collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bertopt.optim._adam import (AdamHyper, adam_direction, bias_correction_factors, consecutive_runs,
                                 foreach_direction, group_by_device_and_dtype, in_float32, one_tensor_at_a_time,
                                 torch_fused_kernel_steps)
from bertopt.optim._dtensor import DTensor, local_part, whole_sums_of_squares
from bertopt.optim.native import build, kernels

# Elements per bucket of the fast paths: 16M (64 MiB of float32 workspace). Large enough
# that per-bucket overhead (one reduction for sharded tensors) is negligible.
BUCKET_NUMEL = 1 << 24


@dataclass(frozen=True)
class LambHyper:
    adam: AdamHyper  # lr, betas, eps, weight_decay, bias_correction (always decoupled)
    adapt: bool  # apply the trust ratio to this group (weight_decay != 0 or always_adapt)
    trust_clip: tuple[float, float] | None  # clamp r to [low, high]


def trust_ratio(param_norm: Tensor, update_norm: Tensor, trust_clip: tuple[float, float] | None) -> Tensor:
    """``||p|| / ||u||``, elementwise over tensors of norms; 1 where either norm is 0."""
    both_nonzero = (param_norm > 0) & (update_norm > 0)
    ratio = torch.where(both_nonzero, param_norm / update_norm, torch.ones_like(param_norm))
    if trust_clip is not None:
        ratio = ratio.clamp(trust_clip[0], trust_clip[1])
    return ratio


def whole_norm(t: Tensor) -> Tensor:
    """The L2 norm of the whole tensor; for a DTensor, DTensor's norm reduced over the mesh."""
    norm = torch.linalg.vector_norm(t)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------------------
# reference


def lamb_reference(params, grads, exp_avgs, exp_avg_sqs, steps, h: LambHyper, clip_coef: Tensor | None):
    """One tensor at a time, exactly the equations in the module docstring (float32 math)."""
    a = h.adam
    for p32, g, m32, v32, step in one_tensor_at_a_time(params, grads, exp_avgs, exp_avg_sqs, steps, clip_coef):
        update = adam_direction(g, m32, v32, step, a)
        if a.weight_decay != 0:
            update = update + a.weight_decay * p32
        ratio = trust_ratio(whole_norm(p32), whole_norm(update), h.trust_clip) if h.adapt else 1.0
        p32.sub_(update * (a.lr * ratio))


# ----------------------------------------------------------------------------------------
# fast paths: lists of local shards, ``owners`` are the (possibly DTensor) parameters


def _whole_norms(local_lists: list[list[Tensor]], owners: list[Tensor]) -> list[Tensor]:
    """Norms of whole tensors for several lists of local shards of the same ``owners``.

    One ``_foreach_norm`` per list (accumulated in float32) and, if any owner is a
    DTensor, one reduction for all lists together.
    """
    norms = [torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32)) for tensors in local_lists]
    if not any(isinstance(o, DTensor) for o in owners):
        return norms
    squares = torch.cat([n * n for n in norms])
    whole = whole_sums_of_squares(squares, owners * len(local_lists)).sqrt()
    return list(whole.split(len(owners)))


def lamb_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, owners, h: LambHyper, clip_coef, workspaces):
    """The reference on lists of local tensors of one device and dtype.

    16-bit tensors are updated through float32 copies (as the fused kernel and the
    reference do): in fp16, (1 - b2) * g * g underflows to 0 and m / (sqrt(v) + eps)
    explodes.
    """
    if params[0].dtype in (torch.float16, torch.bfloat16):
        in_float32(lamb_foreach, params, grads, exp_avgs, exp_avg_sqs, steps, owners, h, clip_coef, workspaces)
        return
    a = h.adam
    torch._foreach_add_(steps, 1)
    if clip_coef is not None:
        grads = torch._foreach_mul(grads, clip_coef.to(grads[0].device))
    updates = foreach_direction(grads, exp_avgs, exp_avg_sqs, steps, a)
    if a.weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=a.weight_decay)
    if not h.adapt:
        torch._foreach_add_(params, updates, alpha=-a.lr)
        return
    param_norms, update_norms = _whole_norms([params, updates], owners)
    scales = trust_ratio(param_norms, update_norms, h.trust_clip) * -a.lr
    torch._foreach_addcmul_(params, updates, list(scales.to(params[0].dtype).unbind(0)))


def lamb_fused(params, grads, exp_avgs, exp_avg_sqs, steps, owners, h: LambHyper, clip_coef, workspaces,
               found_inf: Tensor | None = None):
    """The fastest path for these tensors; see the module docstring.

    float32 CPU: our C kernel (``native.kernels``). Otherwise torch's fused Adam kernel
    for the moments and ``-u`` (into the reused workspace from ``workspaces``), on copies
    of the gradients when there is a clip coefficient (the kernel would store the scaled
    gradient back). ``found_inf`` (0-dim, on the device; 1.0 skips the step) is given on
    the sync-free path: the kernel then changes nothing and the final scales are 0.
    """
    a = h.adam
    lib = build.library() if kernels.eligible(params, grads, exp_avgs, exp_avg_sqs) else None
    if lib is not None:
        _lamb_native_step(lib, params, grads, exp_avgs, exp_avg_sqs, steps, owners, h, clip_coef)
        return
    device = params[0].device
    kernel_steps = torch_fused_kernel_steps(steps, a, found_inf)
    kernel_steps = [s if s.device == device else s.to(device) for s in kernel_steps]
    grad_scale = None if clip_coef is None else (1.0 / clip_coef).to(device)
    found_inf = None if found_inf is None else found_inf.to(device)
    if grad_scale is not None:
        grads = [g.clone() for g in grads]  # at most one bucket (BUCKET_NUMEL elements) at a time
    adam = dict(beta1=a.beta1, beta2=a.beta2, weight_decay=0.0, eps=a.eps, amsgrad=False, maximize=False,
                grad_scale=grad_scale, found_inf=found_inf)
    if not h.adapt:  # r = 1 and wd = 0: a plain Adam step
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], kernel_steps, lr=a.lr, **adam)
        return
    neg_updates = _views(_workspace_for(workspaces, params), params)
    if a.weight_decay != 0:
        for w, p in zip(neg_updates, params):
            torch.mul(p, -a.weight_decay, out=w)
    else:
        torch._foreach_zero_(neg_updates)
    torch._fused_adam_(neg_updates, grads, exp_avgs, exp_avg_sqs, [], kernel_steps, lr=1.0, **adam)
    param_norms, update_norms = _whole_norms([params, neg_updates], owners)
    scales = trust_ratio(param_norms, update_norms, h.trust_clip) * a.lr
    if found_inf is not None:  # skipped: neg_updates holds -wd * p, which must not be applied
        scales = scales * (1 - found_inf)
    torch._foreach_addcmul_(params, neg_updates, list(scales.to(params[0].dtype).unbind(0)))


def _lamb_native_step(lib, params, grads, exp_avgs, exp_avg_sqs, steps, owners, h: LambHyper, clip_coef):
    """float32 CPU: the C kernel's two passes (``csrc/lamb.c``); one pass where r = 1.
    A kernel that refuses (sizes, memory) changes nothing, the step count included,
    except between the two calls of the sharded path. ``.grad`` is only read."""
    a = h.adam
    clip = None if clip_coef is None else clip_coef.item()
    with kernels.counting_the_step(steps):
        bias_corrections = bias_correction_factors(steps, a) if a.bias_correction else None
        if not h.adapt:
            kernels.lamb_moments(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, a, clip,
                                 apply_scales=[a.lr] * len(params))
            return
        if not any(isinstance(o, DTensor) for o in owners):  # both passes in one call, cache-blocked
            kernels.lamb_step(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, a, clip, h.trust_clip)
            return
        p_sq, u_sq = kernels.lamb_moments(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, a, clip,
                                          apply_scales=None)
    # Sharded: the sums of squares of the whole tensors, then pass 2 (u again from p, m, v).
    squares = whole_sums_of_squares(torch.cat([p_sq, u_sq]), owners * 2)
    norms = squares.sqrt().float()
    n = len(params)
    kernels.lamb_apply(lib, params, exp_avgs, exp_avg_sqs, bias_corrections, a,
                       trust_ratio(norms[:n], norms[n:], h.trust_clip) * a.lr)


def _views(workspace: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Consecutive pieces of the flat workspace shaped like ``params``."""
    views, offset = [], 0
    for p in params:
        views.append(workspace[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


IMPLEMENTATIONS = {"foreach": lamb_foreach, "fused": lamb_fused}


def _workspace_for(workspaces: dict, params: list[Tensor]) -> Tensor:
    """A reused flat buffer on the params' device/dtype with room for them all."""
    needed = sum(p.numel() for p in params)
    key = (params[0].device, params[0].dtype)
    buffer = workspaces.get(key)
    if buffer is None or buffer.numel() < needed:
        buffer = torch.empty(max(needed, 1), dtype=params[0].dtype, device=params[0].device)
        workspaces[key] = buffer
    return buffer


def lamb(params, grads, exp_avgs, exp_avg_sqs, steps, h: LambHyper, clip_coef: Tensor | None, impl: str,
         workspaces: dict | None = None, found_inf: Tensor | None = None):
    """Apply one LAMB update with the chosen implementation.

    ``params`` etc. may be DTensors; the fast paths work on their local shards.
    ``workspaces`` (fused on non-CPU/non-float32 tensors) maps (device, dtype) to a reused
    buffer; pass the same dict every step. ``found_inf``: see ``lamb_fused`` (only the
    fused implementation takes it).
    """
    if not params:
        return
    if impl == "reference":
        lamb_reference(params, grads, exp_avgs, exp_avg_sqs, steps, h, clip_coef)
        return
    fn = IMPLEMENTATIONS[impl]
    extra = {} if found_inf is None else {"found_inf": found_inf}
    workspaces = {} if workspaces is None else workspaces
    local = [[local_part(t) for t in tensors] for tensors in (params, grads, exp_avgs, exp_avg_sqs)]
    for chunk in group_by_device_and_dtype(*local, steps, params):
        owners = chunk[5]  # buckets by the whole tensors' sizes: the same on every process
        for a, b in consecutive_runs(owners, BUCKET_NUMEL):
            fn(*[lst[a:b] for lst in chunk], h, clip_coef, workspaces, **extra)
