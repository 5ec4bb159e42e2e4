"""ctypes calls into the native kernels (``../csrc``), one Python function per C entry point.

Every kernel takes its hyperparameters as one ``bertopt_hyper`` struct, mirrored here by
:class:`Hyper` (same fields, same order; ``build`` checks version and size at load, and
each kernel checks ``version`` again). Pointers to the tensors' data go in as arrays.
The functions check sizes before the C code runs (a mismatch would write out of bounds),
and report a kernel's refusal as an exception; a refused call has written nothing.

Why these kernels exist: an optimizer step is memory traffic. Per float32 parameter
BERT's step must read g once for the global norm (4 bytes) and then read p, g, m, v and
write p, m, v (28 bytes): 32 bytes is the floor. torch's fused CPU Adam kernel, handed
the clip coefficient as ``grad_scale``, also writes the scaled gradient back (36 bytes);
``clip_grad_norm_`` + ``AdamW(fused=True)`` moves 40. ``adam_step`` moves 32 with no
temporaries, computing the reference's float32 operations (``_adam``) in its order.
LAMB moves at most 44 (``csrc/lamb.c``). No kernel writes ``.grad``.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import Counter

import torch
from torch import Tensor

ABI_VERSION = 4  # csrc/bertopt.h BERTOPT_ABI_VERSION
_OK, _ENOMEM, _EVERSION = 0, -1, -2

# Elements per work item: 256K floats = 1 MiB per array, large enough that the per-item
# overhead vanishes, small enough to balance two busy cores.
CHUNK = 1 << 18
# LAMB's one-call step: pass 1 streams p, g, m, v (16 bytes per element) through the
# cache; with 1M elements per segment the p, m, v that pass 2 rereads (12 MiB) are still
# in a last-level cache of 32 MiB. Items of 64K elements split a segment into parts of
# nearly equal size.
SEGMENT_NUMEL = 1 << 20
SEGMENT_CHUNK = 1 << 16

# Calls per C entry point in this process (tests check that a path really ran native code).
calls: Counter = Counter()


class Hyper(ctypes.Structure):
    """``bertopt_hyper`` of csrc/bertopt.h, field for field."""

    _fields_ = [
        ("version", ctypes.c_int32),
        ("n_threads", ctypes.c_int32),
        ("chunk", ctypes.c_int64),
        ("lr", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("clip", ctypes.c_float),
        ("has_clip", ctypes.c_int32),
        ("decoupled", ctypes.c_int32),
        ("has_trust_clip", ctypes.c_int32),
        ("trust_low", ctypes.c_float),
        ("trust_high", ctypes.c_float),
        ("segment", ctypes.c_int64),
    ]


def hyper(h, clip_coef: float | None, *, chunk: int = CHUNK, trust_clip: tuple[float, float] | None = None,
          segment: int = SEGMENT_NUMEL) -> Hyper:
    """The struct for an ``_adam.AdamHyper`` ``h`` (c_float rounds the Python doubles as torch
    turns them into float32 for float32 math, ``1 - beta`` included)."""
    low, high = trust_clip if trust_clip is not None else (0.0, 0.0)
    return Hyper(version=ABI_VERSION, n_threads=torch.get_num_threads(), chunk=chunk, lr=h.lr,
                 beta1=h.beta1, beta2=h.beta2, one_minus_beta1=1.0 - h.beta1, one_minus_beta2=1.0 - h.beta2,
                 eps=h.eps, weight_decay=h.weight_decay, clip=1.0 if clip_coef is None else clip_coef,
                 has_clip=clip_coef is not None, decoupled=h.decoupled, has_trust_clip=trust_clip is not None,
                 trust_low=low, trust_high=high, segment=segment)


def declare(lib: ctypes.CDLL) -> None:
    """Give the entry points their ctypes signatures (``build`` calls this at load)."""
    ptr, i64, c_int, hyper_p = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(Hyper)
    lib.bertopt_abi_version.restype = i64
    lib.bertopt_hyper_size.restype = i64
    lib.bertopt_sumsq_f32.restype = c_int
    lib.bertopt_sumsq_f32.argtypes = [ptr, ptr, i64, ctypes.POINTER(ctypes.c_double), hyper_p]
    lib.bertopt_adam_f32.restype = c_int
    lib.bertopt_adam_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, hyper_p]
    lib.bertopt_lamb_moments_f32.restype = c_int
    lib.bertopt_lamb_moments_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, hyper_p]
    lib.bertopt_lamb_apply_f32.restype = c_int
    lib.bertopt_lamb_apply_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, hyper_p]
    lib.bertopt_lamb_step_f32.restype = c_int
    lib.bertopt_lamb_step_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, hyper_p]


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def eligible(*tensor_lists: list[Tensor]) -> bool:
    """True if the kernels can work on these tensors in place: CPU, float32, dense, contiguous.

    Tensor subclasses (DTensor, fake tensors under tracing) are left to torch's kernels.
    """
    return all(
        type(t) in _PLAIN_TENSOR_TYPES and t.is_cpu and t.dtype is torch.float32
        and t.layout is torch.strided and t.is_contiguous()
        for tensors in tensor_lists for t in tensors
    )


def _pointers(tensors: list[Tensor]):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _int64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def _floats(values) -> ctypes.Array:
    # torch turns Python doubles into float32 for float32 math; so do we (c_float rounds).
    return (ctypes.c_float * len(values))(*values)


def _bias_corrections(bias_corrections):
    """``(bc1, bc2)`` as the kernels take them: float arrays, or (None, None) for none."""
    if bias_corrections is None:
        return None, None
    return _floats(bias_corrections[0]), _floats(bias_corrections[1])


def _check(err: int, kernel: str) -> None:
    if err == _ENOMEM:
        raise MemoryError(f"bertopt native kernel {kernel}: out of memory for its work list")
    if err == _EVERSION:
        raise RuntimeError(f"bertopt native kernel {kernel}: ABI version mismatch with kernels.Hyper "
                           f"(Python {ABI_VERSION}); rebuild the library")
    if err != _OK:
        raise RuntimeError(f"bertopt native kernel {kernel} returned {err}")


def check_sizes(params: list[Tensor], **lists: list[Tensor]) -> list[int]:
    """The parameters' sizes, after checking that every tensor of ``lists`` has its
    parameter's size. The kernels index all of them by the parameter's size: a mismatch
    (say, optimizer state loaded for another model) must stop here, not write out of bounds."""
    n = len(params)
    numels = [t.numel() for t in params]
    for name, tensors in lists.items():
        if len(tensors) != n or any(t.numel() != k for t, k in zip(tensors, numels)):
            bad = next((i for i, (t, k) in enumerate(zip(tensors, numels)) if t.numel() != k), None)
            detail = f"parameter {bad} has {numels[bad]} elements, its {name} {tensors[bad].numel()}" \
                if bad is not None else f"{n} parameters but {len(tensors)} {name} tensors"
            raise ValueError(f"{name} must match its parameter in size: {detail}")
    return numels


@contextlib.contextmanager
def counting_the_step(steps: list[Tensor]):
    """Add 1 to the step counters for a kernel call inside the block; if the kernel refuses
    (ValueError, MemoryError, RuntimeError: raised before it writes anything), put them back, so the
    optimizer is as it was and the step can be retried."""
    torch._foreach_add_(steps, 1)
    try:
        yield
    except (MemoryError, ValueError, RuntimeError):
        torch._foreach_sub_(steps, 1)
        raise


def _written(*tensor_lists: list[Tensor]) -> None:
    # We wrote through raw pointers; tell autograd, as torch's own in-place ops do, so that
    # a backward through a graph that saved these tensors still raises.
    for tensors in tensor_lists:
        torch.autograd.graph.increment_version(tensors)


def sum_of_squares(lib: ctypes.CDLL, tensors: list[Tensor]) -> float:
    """Sum of squares of float32 CPU tensors (``eligible``): float32 within blocks of 256
    elements, double across them (csrc/norm.c)."""
    total = ctypes.c_double()
    job = Hyper(version=ABI_VERSION, n_threads=torch.get_num_threads(), chunk=CHUNK)  # all the norm reads
    calls["sumsq"] += 1
    err = lib.bertopt_sumsq_f32(_pointers(tensors), _int64s([t.numel() for t in tensors]), len(tensors),
                                ctypes.byref(total), ctypes.byref(job))
    _check(err, "sumsq")
    return total.value


def adam_step(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef: float | None) -> None:
    """One in-place BERT Adam update on ``eligible`` tensors (``_adam`` has the equations).

    ``bias_corrections`` is None or a pair of per-tensor lists ``(1 - b1**t, 1 - b2**t)``.
    """
    numels = check_sizes(params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    bc1, bc2 = _bias_corrections(bias_corrections)
    calls["adam"] += 1
    err = lib.bertopt_adam_f32(_pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
                               _int64s(numels), len(params), bc1, bc2, ctypes.byref(hyper(h, clip_coef)))
    _check(err, "adam")
    _written(params, exp_avgs, exp_avg_sqs)


def lamb_moments(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef: float | None,
                 apply_scales: list[float] | None) -> tuple[Tensor, Tensor]:
    """LAMB's pass 1 on ``eligible`` tensors; returns per-tensor sums of squares (float64) of p and u.

    New m and v; with ``apply_scales`` also ``p -= u * scale`` (tensors that are not adapted).
    """
    numels = check_sizes(params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    n = len(params)
    p_sq, u_sq = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    bc1, bc2 = _bias_corrections(bias_corrections)
    scales = None if apply_scales is None else _floats(apply_scales)
    calls["lamb_moments"] += 1
    err = lib.bertopt_lamb_moments_f32(
        _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs), _int64s(numels), n,
        bc1, bc2, scales, p_sq.data_ptr(), u_sq.data_ptr(), ctypes.byref(hyper(h, clip_coef)))
    _check(err, "lamb_moments")
    _written(exp_avgs, exp_avg_sqs, *([params] if apply_scales is not None else []))
    return p_sq, u_sq


def lamb_apply(lib, params, exp_avgs, exp_avg_sqs, bias_corrections, h, scales: Tensor) -> None:
    """LAMB's pass 2: ``p -= u * scale`` per tensor, u recomputed from p and the m, v of
    pass 1 (``scales``: lr * r, one per tensor)."""
    numels = check_sizes(params, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    scales = scales.to(torch.float32).contiguous()
    if scales.numel() != len(params):
        raise ValueError(f"one scale per tensor: {len(params)} tensors, {scales.numel()} scales")
    bc1, bc2 = _bias_corrections(bias_corrections)
    calls["lamb_apply"] += 1
    err = lib.bertopt_lamb_apply_f32(_pointers(params), _pointers(exp_avgs), _pointers(exp_avg_sqs),
                                     _int64s(numels), len(params), bc1, bc2, scales.data_ptr(),
                                     ctypes.byref(hyper(h, None)))
    _check(err, "lamb_apply")
    _written(params)


def lamb_step(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef: float | None,
              trust_clip: tuple[float, float] | None, segment_numel: int = SEGMENT_NUMEL) -> None:
    """Both LAMB passes on unsharded, adapted tensors, a cache-sized segment at a time."""
    numels = check_sizes(params, grad=grads, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs)
    bc1, bc2 = _bias_corrections(bias_corrections)
    calls["lamb_step"] += 1
    err = lib.bertopt_lamb_step_f32(
        _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs), _int64s(numels),
        len(params), bc1, bc2,
        ctypes.byref(hyper(h, clip_coef, chunk=SEGMENT_CHUNK, trust_clip=trust_clip, segment=segment_numel)))
    _check(err, "lamb_step")  # on an error nothing was written
    _written(exp_avgs, exp_avg_sqs, params)
