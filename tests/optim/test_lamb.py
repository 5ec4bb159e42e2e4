"""Lamb: the update against a float64 transcription of the issue's equations, the trust
ratio's edge cases and adapt rule, implementation parity, resume, non-finite skip,
dtypes, workspace reuse, validation. (Equivalence with other libraries:
test_lamb_reference.py; sharded parameters: test_sharded.py.)"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bertopt import BertAdam, Lamb
from bertopt.optim import _lamb
from bertopt.optim.native import build, kernels

# "fused" on float32 CPU tensors is our C kernel (csrc/lamb.c); "fused-torch" is the
# same fused path with the C kernel unavailable: torch's fused Adam kernel + workspace,
# what other devices and dtypes get.
FUSED_TORCH = dict(fused=True)
IMPLS = [dict(foreach=False, fused=False), dict(foreach=True), dict(fused=True), FUSED_TORCH]
IMPL_IDS = ["reference", "foreach", "fused", "fused-torch"]


def native_off():
    return mock.patch.object(build, "library", lambda: None)


def path_of(impl):
    return native_off() if impl is FUSED_TORCH else contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _fused_torch_path(request):
    """Tests parametrized with FUSED_TORCH run with the C kernel unavailable."""
    callspec = getattr(request.node, "callspec", None)
    with path_of(callspec.params.get("impl") if callspec else None):
        yield
SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (4, 3)]


def make_params(seed=0, dtype=torch.float32, shapes=SHAPES, zero_last=False):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    if zero_last:
        with torch.no_grad():
            params[-1].zero_()
    return params


def grad_sequence(shapes, steps, seed=1):
    """Gradients whose global norm goes above and below 1 (so clipping sometimes triggers)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (0.05 + (i % 4)) for s in shapes] for i in range(steps)]


def run(opt_factory, grads, dtype=torch.float32, seed=0, shapes=SHAPES, zero_last=False):
    params = make_params(seed, dtype, shapes, zero_last)
    opt = opt_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype).clone()
        opt.step()
    return params, opt


def max_abs_diff(xs, ys):
    return max(((x.detach().double() - y.detach().double()).abs().max().item()
                for x, y in zip(xs, ys) if x.numel()), default=0.0)


def two_groups(params, **decayed_group):
    """Group 0: params 0, 2, 4 with the optimizer's weight decay; group 1: the rest, wd 0."""
    return [{"params": [params[0], params[2], params[4]], **decayed_group},
            {"params": [params[1], params[3]], "weight_decay": 0.0}]


# --- the update itself -------------------------------------------------------------------


def lamb_numpy(params0, grads, lr, wd_per_param, adapt_per_param, b1=0.9, b2=0.999, eps=1e-6, clip=1.0,
               bias_correction=True, trust_clip=None):
    """The issue's equations, transcribed in float64."""
    ps = [p.detach().double().numpy().copy() for p in params0]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    for t, step_grads in enumerate(grads, start=1):
        gs = [g.double().numpy() for g in step_grads]
        norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
        if clip is not None:
            gs = [g * clip / max(norm, clip) for g in gs]
        for i, g in enumerate(gs):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            m_hat, v_hat = (ms[i] / (1 - b1**t), vs[i] / (1 - b2**t)) if bias_correction else (ms[i], vs[i])
            u = m_hat / (np.sqrt(v_hat) + eps) + wd_per_param[i] * ps[i]
            r = 1.0
            if adapt_per_param[i]:
                w_norm, u_norm = np.linalg.norm(ps[i]), np.linalg.norm(u)
                r = w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
                if trust_clip is not None:
                    r = min(max(r, trust_clip[0]), trust_clip[1])
            ps[i] = ps[i] - lr * r * u
    return ps


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize(
    "options",
    [dict(), dict(max_grad_norm=None), dict(bias_correction=False), dict(always_adapt=True),
     dict(trust_clip=(0.0, 1.0)), dict(trust_clip=(0.9, 1.1), always_adapt=True)],
    ids=["defaults", "no-clip", "no-bias-correction", "always-adapt", "trust-clip-0-1", "trust-clip-tight"],
)
def test_matches_the_equations_in_float64(impl, options):
    # Ours in float32 vs the equations in float64 over 30 steps with lr 0.02 (parameters
    # of order 1, max ~3): float32 rounding only. Measured: <= 7.5e-7 (~3 ulps); held 2e-6.
    grads = grad_sequence(SHAPES, 30)
    params, _ = run(lambda ps: Lamb(two_groups(ps), lr=0.02, **options, **impl), grads, zero_last=True)
    always = options.get("always_adapt", False)
    expected = lamb_numpy(
        make_params(zero_last=True), grads, 0.02,
        wd_per_param=[0.01, 0.0, 0.01, 0.0, 0.01],
        adapt_per_param=[True, always, True, always, True],
        clip=options.get("max_grad_norm", 1.0), bias_correction=options.get("bias_correction", True),
        trust_clip=options.get("trust_clip"),
    )
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().double().numpy(), e, atol=2e-6, rtol=0)
    assert max_abs_diff(params, make_params(zero_last=True)) > 0.1  # the parameters really moved


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_group_without_decay_takes_a_plain_adam_step(impl):
    # apex's rule: r = 1 where weight_decay == 0 (unless always_adapt): torch's Adam.
    grads = grad_sequence(SHAPES, 20)
    ours, _ = run(lambda ps: Lamb(ps, lr=0.01, weight_decay=0.0, max_grad_norm=None, **impl), grads)
    theirs, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-6), grads)
    assert max_abs_diff(ours, theirs) < 5e-6
    adapted, _ = run(lambda ps: Lamb(ps, lr=0.01, weight_decay=0.0, max_grad_norm=None, always_adapt=True, **impl), grads)
    assert max_abs_diff(adapted, theirs) > 1e-3


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_first_step_moves_each_adapted_tensor_by_lr_times_its_norm(impl):
    # With r = ||p||/||u||, the step lr*r*u has norm lr*||p|| exactly, whatever g is.
    params = make_params(shapes=[(6, 4), (5,)])
    start = [p.detach().clone() for p in params]
    for p, scale in zip(params, (1e-3, 50.0)):
        p.grad = torch.randn(p.shape) * scale
    Lamb(params, lr=0.1, **impl).step()
    for p, s in zip(params, start):
        assert torch.linalg.vector_norm(p.detach() - s).item() == pytest.approx(0.1 * torch.linalg.vector_norm(s).item(), rel=1e-5)


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_zero_norms_give_ratio_one(impl):
    # ||p|| = 0: the step is lr*u (Adam's first bias-corrected step is g/(|g|+eps) = sign(g)).
    zero = torch.nn.Parameter(torch.zeros(4))
    zero.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    # ||u|| = 0 (zero gradient, no decay) with always_adapt: nothing moves, nothing is nan.
    still = torch.nn.Parameter(torch.ones(3))
    still.grad = torch.zeros(3)
    Lamb([{"params": [zero]}, {"params": [still], "weight_decay": 0.0, "eps": 1e-6}], lr=0.5, eps=0.0,
         always_adapt=True, max_grad_norm=None, **impl).step()
    torch.testing.assert_close(zero.detach(), -0.5 * torch.sign(zero.grad), atol=1e-6, rtol=0)
    assert torch.equal(still.detach(), torch.ones(3))


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_trust_clip_bounds_the_ratio(impl):
    # ||p|| = 100 * sqrt(4), ||u|| = sqrt(4) on the first step (eps = 0, wd = 0): r = 100.
    # (atol: one float32 ulp at 100 is 7.6e-6.)
    def step(trust_clip):
        p = torch.nn.Parameter(torch.full((4,), 100.0))
        p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
        Lamb([p], lr=1e-3, eps=0.0, weight_decay=0.0, always_adapt=True, max_grad_norm=None,
             trust_clip=trust_clip, **impl).step()
        return (100.0 - p.detach()).abs()
    torch.testing.assert_close(step(None), torch.full((4,), 0.1), rtol=0, atol=1e-5)
    torch.testing.assert_close(step((0.0, 10.0)), torch.full((4,), 0.01), rtol=0, atol=1e-5)
    torch.testing.assert_close(step((200.0, 300.0)), torch.full((4,), 0.2), rtol=0, atol=1e-5)


def test_grad_norm_is_reported_and_clip_uses_tf_formula():
    params = make_params()
    grads = [torch.full(p.shape, 2.0) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = Lamb(params, lr=0.1, foreach=False)
    opt.step()
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert opt.last_grad_norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
    m = opt.state[params[0]]["exp_avg"]
    torch.testing.assert_close(m, torch.full_like(m, 0.1 * 2.0 / expected_norm.item()), rtol=1e-6, atol=0)


# --- implementations ----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5),
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.95),
    beta2=st.floats(0.9, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    bias_correction=st.booleans(),
    always_adapt=st.booleans(),
    trust_clip=st.sampled_from([None, (0.0, 1.0), (0.5, 2.0)]),
    clip=st.sampled_from([None, 0.5, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_implementations_agree(shapes, lr, beta1, beta2, eps, weight_decay, bias_correction, always_adapt,
                               trust_clip, clip, seed):
    # fp32, 8 steps, shapes including 0-dim and empty tensors: the fast paths stay within
    # 1e-5 absolute of the reference (parameters of order 1, lr <= 0.1). Differences come
    # from the fused kernel's (sqrt(v)/sqrt(bc2) + eps) and g/(1/c), and norm summation order.
    grads = grad_sequence(shapes, 8, seed=seed)
    kwargs = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                  always_adapt=always_adapt, trust_clip=trust_clip, max_grad_norm=clip)
    ref, ref_opt = run(lambda ps: Lamb(ps, **IMPLS[0], **kwargs), grads, seed=seed, shapes=shapes)
    for impl in IMPLS[1:]:
        with path_of(impl):
            out, opt = run(lambda ps: Lamb(ps, **impl, **kwargs), grads, seed=seed, shapes=shapes)
        assert max_abs_diff(ref, out) <= 1e-5
        for p_ref, p_out in zip(ref, out):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ref_opt.state[p_ref][key], opt.state[p_out][key], rtol=1e-5, atol=1e-7)
            assert opt.state[p_out]["step"].item() == 8


@pytest.mark.parametrize("impl", IMPLS[1:], ids=IMPL_IDS[1:])
def test_buckets_split_the_work_without_changing_the_result(impl, monkeypatch):
    grads = grad_sequence(SHAPES, 6)
    whole, _ = run(lambda ps: Lamb(two_groups(ps), lr=0.05, **impl), grads)
    monkeypatch.setattr(_lamb, "BUCKET_NUMEL", 10)  # every tensor in its own bucket, or two small ones
    split, opt = run(lambda ps: Lamb(two_groups(ps), lr=0.05, **impl), grads)
    assert max_abs_diff(whole, split) == 0.0
    if impl is FUSED_TORCH:  # the workspace is as large as the largest bucket, not the model
        (workspace,) = opt._workspaces.values()
        assert workspace.numel() == max(math.prod(s) for s in SHAPES)


@native_off()
def test_fused_torch_path_reuses_its_workspace():
    params = make_params()
    opt = Lamb(params, lr=0.01, fused=True)
    buffers = []
    for step_grads in grad_sequence(SHAPES, 3):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        (workspace,) = opt._workspaces.values()
        buffers.append(workspace.data_ptr())
    assert len(set(buffers)) == 1
    assert workspace.numel() == sum(p.numel() for p in params)
    assert "_workspaces" not in opt.state_dict()["bertopt"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_low_precision_params_follow_float32(dtype, impl):
    grads = grad_sequence(SHAPES, 10)
    fp32, _ = run(lambda ps: Lamb(two_groups(ps), lr=0.01, foreach=False), grads)
    low, opt = run(lambda ps: Lamb(two_groups(ps), lr=0.01, **impl), grads, dtype=dtype)
    assert all(p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype for p in low)
    # bf16 keeps 8 bits of mantissa: parameters of order 1 agree to a few bf16 ulps (2^-7).
    tol = 0.05 if dtype == torch.bfloat16 else 5e-3
    assert max_abs_diff(fp32, low) < tol


def test_one_library_holds_every_kernel():
    # BertAdam's and LAMB's kernels are compiled together (one thread pool): if one of
    # them stops compiling, both fall back to torch; say so loudly here.
    lib = build.library()
    if lib is None:
        pytest.skip(build.status())
    for name in ("bertopt_sumsq_f32", "bertopt_adam_f32", "bertopt_lamb_moments_f32", "bertopt_lamb_apply_f32",
                 "bertopt_lamb_step_f32"):
        assert hasattr(lib, name), name


def test_the_u_over_g_variant_is_built_with_a_define_and_computes_the_same(tmp_path):
    # benchmarks/lamb_grad_ab.py times lamb.c built with -DLAMB_U_OVER_G (u stored over the
    # gradient in pass 1, read back in pass 2) against the shipped kernel: the same float32
    # parameters and moments, and only the variant writes the gradient.
    if build.library() is None:
        pytest.skip(build.status())
    from bertopt.optim._adam import AdamHyper

    variant = build.variant_library(tmp_path, {"LAMB_U_OVER_G": 1})
    h = AdamHyper(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                  decoupled=True)
    results = {}
    for name, lib in (("shipped", build.library()), ("variant", variant)):
        p = make_params(shapes=SHAPES)
        data, grads = [x.detach() for x in p], grad_sequence(SHAPES, 1)[0]
        m, v = [torch.zeros_like(x) for x in data], [torch.zeros_like(x) for x in data]
        kernels.lamb_step(lib, data, grads, m, v, ([0.1] * len(data), [0.001] * len(data)), h, 0.5, None,
                          segment_numel=64)
        results[name] = data, m, v, grads
    for a, b in zip(results["shipped"][:3], results["variant"][:3]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    fresh = grad_sequence(SHAPES, 1)[0]
    assert all(torch.equal(g, f) for g, f in zip(results["shipped"][3], fresh))
    assert not all(torch.equal(g, f) for g, f in zip(results["variant"][3], fresh))


def test_default_is_the_native_kernel_on_cpu_float32_and_it_leaves_grad_alone():
    if build.library() is None:
        pytest.skip(build.status())
    params = make_params()
    start = [p.detach().clone() for p in params]
    grads = grad_sequence(SHAPES, 1)[0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = Lamb(two_groups(params), lr=0.05, max_grad_norm=None)  # default implementation
    before = dict(kernels.calls)
    opt.step()
    assert kernels.calls["lamb_step"] == before.get("lamb_step", 0) + 1
    assert not opt._workspaces  # no temporaries
    for i in (0, 2, 4):  # adapted: p moved by lr * (||p|| / ||u||) * u, u from the first step's m, v
        state = opt.state[params[i]]
        m_hat, v_hat = state["exp_avg"] / (1 - 0.9), state["exp_avg_sq"] / (1 - 0.999)
        u = m_hat / (v_hat.sqrt() + 1e-6) + 0.01 * start[i]
        r = torch.linalg.vector_norm(start[i]) / torch.linalg.vector_norm(u)
        torch.testing.assert_close(start[i] - params[i].detach(), 0.05 * r * u, rtol=1e-5, atol=1e-7)
    for i in range(len(params)):  # .grad is only read
        assert torch.equal(params[i].grad, grads[i])


LARGE_SHAPES = [(3000, 1000), (3, 1_000_003), (1000,), (1500, 1024), (5,)]  # 6.5M elements: both threads join


@pytest.mark.parametrize("trust_clip", [None, (0.5, 2.0)])
def test_native_step_is_the_same_for_any_segment_size_and_thread_count(trust_clip):
    # The one-call step works segment by segment, each split into parts that threads
    # claim, with a barrier between the passes. Its per-tensor norms are summed in a
    # fixed order, so the segment size and the number of threads must not change a bit;
    # and it must equal the two-call path (moments, then apply) up to norm summation order.
    lib = build.library()
    if lib is None:
        pytest.skip(build.status())
    from bertopt.optim._adam import AdamHyper

    h = AdamHyper(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                  decoupled=True)
    bias_corrections = ([1 - 0.9**3] * len(LARGE_SHAPES), [1 - 0.999**3] * len(LARGE_SHAPES))
    gen = torch.Generator().manual_seed(0)
    start = [[torch.randn(s, generator=gen) * scale for s in LARGE_SHAPES] for scale in (0.02, 1e-3, 1e-2, 1e-5)]
    start[3] = [v.abs() for v in start[3]]  # v >= 0

    def run(fn):
        p, g, m, v = [[t.clone() for t in ts] for ts in start]
        fn(p, g, m, v)
        return p + g + m + v

    results = {}
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for segment in (1 << 30, 2_000_000, 1):
                results[n_threads, segment] = run(lambda p, g, m, v: kernels.lamb_step(
                    lib, p, g, m, v, bias_corrections, h, 0.7, trust_clip, segment_numel=segment))
    finally:
        torch.set_num_threads(threads)
    first = next(iter(results.values()))
    for key, out in results.items():
        assert all(torch.equal(a, b) for a, b in zip(first, out)), key

    def two_calls(p, g, m, v):
        p_sq, u_sq = kernels.lamb_moments(lib, p, g, m, v, bias_corrections, h, 0.7, apply_scales=None)
        norms = torch.cat([p_sq, u_sq]).sqrt().float()
        kernels.lamb_apply(lib, p, m, v, bias_corrections, h, _lamb.trust_ratio(norms[:5], norms[5:], trust_clip) * h.lr)

    for a, b in zip(first, run(two_calls)):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=0)


FAILING_CALLOC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
static size_t fail_n = 0;
void arm(size_t n) { fail_n = n; }
void *calloc(size_t n, size_t size) {  /* fails once for n elements of 8 bytes, once armed */
    static void *(*real)(size_t, size_t);
    if (fail_n && n == fail_n && size == 8) { fail_n = 0; return NULL; }
    if (!real) real = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    return real(n, size);
}
"""

OUT_OF_MEMORY_STEP = """
import ctypes, sys, torch
from bertopt import Lamb
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(100_000)), torch.nn.Parameter(torch.randn(300_001))]
opt = Lamb(params, lr=0.01)
for p in params:
    p.grad = torch.randn_like(p)
opt.step()  # state exists; the next step is the one that fails
for p in params:
    p.grad = torch.randn_like(p)
before = [t.clone() for p in params for t in (p.detach(), p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
# its work list: 2 + 5 items of 64K elements, whose per-item sums calloc(7, 8) gets
ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL).arm(ctypes.c_size_t(7))
try:
    opt.step()
except MemoryError:
    pass
else:
    sys.exit("no MemoryError")
after = [t for p in params for t in (p.detach(), p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]
assert all(torch.equal(a, b) for a, b in zip(before, after)), "a tensor changed"
assert all(opt.state[p]["step"].item() == 1 for p in params), "the step count moved"
print("unchanged")
"""


def test_out_of_memory_in_the_native_step_changes_nothing(tmp_path):
    # The kernel allocates everything before it touches a tensor, and the step count is
    # put back: a MemoryError leaves the optimizer as it was, so the step can be retried.
    if build.library() is None:
        pytest.skip(build.status())
    import os
    import subprocess
    import sys

    cc = build.find_compiler()
    shim = tmp_path / "failing_calloc.so"
    (tmp_path / "failing_calloc.c").write_text(FAILING_CALLOC)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", str(tmp_path / "failing_calloc.c"), "-o", str(shim), "-ldl"],
                   check=True, capture_output=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_STEP, str(shim)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "unchanged", out.stderr[-2000:]


# --- state ---------------------------------------------------------------------------------


def test_lamb_settings_come_from_the_checkpoint():
    # (the bit-exact resume of every optimizer is in test_optimizer_properties.py)
    params = make_params()
    for p, g in zip(params, grad_sequence(SHAPES, 1)[0]):
        p.grad = g
    opt = Lamb(two_groups(params), lr=0.01, trust_clip=(0.1, 5.0), always_adapt=True)
    opt.step()
    fresh = Lamb(two_groups(make_params()), lr=0.5, trust_clip=None, always_adapt=False)
    fresh.load_state_dict(opt.state_dict())
    assert [(g["trust_clip"], g["always_adapt"], g["lr"]) for g in fresh.param_groups] == [((0.1, 5.0), True, 0.01)] * 2


def test_state_names_are_torchs():
    params, opt = run(lambda ps: Lamb(ps, lr=0.01), grad_sequence(SHAPES, 3))
    state = opt.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["step"].dtype == torch.float32 and state["step"].item() == 3
    # A BertAdam/AdamW checkpoint's moments load into Lamb (e.g. to switch optimizers).
    _, adam = run(lambda ps: BertAdam(ps, lr=0.01), grad_sequence(SHAPES, 3))
    fresh = Lamb(make_params(), lr=0.01)
    fresh.load_state_dict(adam.state_dict())
    assert fresh.param_groups[0]["trust_clip"] is None and fresh.param_groups[0]["always_adapt"] is False


def test_reference_and_foreach_leave_the_gradient_alone():
    for impl in IMPLS[:2]:
        params = make_params()
        grads = [torch.full(p.shape, 3.0) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        Lamb(params, lr=0.1, **impl).step()  # clipping triggers (norm ~ 3*sqrt(70))
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(eps=-1e-6), "eps must be >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(betas=(1.0, 0.999)), "betas[0] must be in [0, 1)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
        (dict(trust_clip=(1.0, 0.5)), "trust_clip must be None or a pair (low, high) with 0 <= low <= high"),
        (dict(trust_clip=(-0.1, 1.0)), "trust_clip must be None or a pair"),
        (dict(trust_clip=(0.1,)), "trust_clip must be None or a pair"),
        (dict(trust_clip=1.0), "trust_clip must be None or a pair"),
        (dict(trust_clip=(0.0, float("nan"))), "trust_clip must be None or a pair"),
        (dict(trust_clip=True), "trust_clip must be None or a pair"),
        (dict(always_adapt=1), "always_adapt must be True or False"),
        (dict(foreach=True, fused=True), "foreach and fused cannot both be True"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        Lamb(make_params(), **kwargs)
    assert words in str(info.value)


def test_upper_trust_clip_may_be_infinite():
    Lamb(make_params(), trust_clip=(0.01, float("inf")))


def test_invalid_param_group_added_later_is_rejected():
    opt = Lamb(make_params()[:2])
    with pytest.raises(ValueError, match="trust_clip must be None or a pair"):
        opt.add_param_group({"params": make_params()[2:], "trust_clip": (2.0, 1.0)})
