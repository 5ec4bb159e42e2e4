"""BertAdam: the update against independent transcriptions and torch's optimizers,
implementation parity, resume, non-finite skip, dtypes, AMP, compile, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bertopt import BertAdam
from bertopt.optim.base import choose_implementation

IMPLS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
IMPL_IDS = ["reference", "foreach", "fused"]
SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]


def make_params(seed=0, dtype=torch.float32, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grad_sequence(shapes, steps, seed=1, scale=1.0):
    """Gradients whose global norm goes above and below 1 (so clipping sometimes triggers)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * scale * (0.05 + (i % 4)) for s in shapes] for i in range(steps)]


def run(opt_factory, grads, dtype=torch.float32, seed=0, shapes=SHAPES):
    params = make_params(seed, dtype, shapes)
    opt = opt_factory(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype).clone()
        opt.step()
    return params, opt


def max_abs_diff(xs, ys):
    return max((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(xs, ys))


# --- the update itself -------------------------------------------------------------


def google_numpy(params0, grads, lr, wd_mask, wd=0.01, b1=0.9, b2=0.999, eps=1e-6, clip=1.0):
    """Google's AdamWeightDecayOptimizer + tf.clip_by_global_norm, transcribed in float64."""
    ps = [p.detach().double().numpy().copy() for p in params0]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    for step_grads in grads:
        gs = [g.double().numpy() for g in step_grads]
        norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
        if clip is not None:
            gs = [g * clip / max(norm, clip) for g in gs]
        for i, g in enumerate(gs):
            ms[i] = b1 * ms[i] + (1 - b1) * g
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            update = ms[i] / (np.sqrt(vs[i]) + eps)
            if wd_mask[i]:
                update = update + wd * ps[i]
            ps[i] = ps[i] - lr * update
    return ps


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_matches_google_equations_in_float64(impl, clip):
    # Google's update in float64 vs ours in float32 over 40 steps: the only difference is
    # float32 rounding, so 2e-5 absolute on parameters of order 1 (seen: ~1e-6).
    grads = grad_sequence(SHAPES, 40)
    wd_mask = [True, False, True, False]
    params, _ = run(
        lambda ps: BertAdam(
            [{"params": [ps[0], ps[2]]}, {"params": [ps[1], ps[3]], "weight_decay": 0.0}],
            lr=0.02, max_grad_norm=clip, **impl,
        ),
        grads,
    )
    expected = google_numpy(make_params(), grads, 0.02, wd_mask, clip=clip)
    # params are listed in creation order; groups reorder them, so compare by position
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().double().numpy(), e, atol=2e-5, rtol=0)
    assert max_abs_diff(params, make_params()) > 0.1  # the parameters really moved


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_bias_correction_is_torch_adamw(impl):
    grads = grad_sequence(SHAPES, 30)
    ours, _ = run(lambda ps: BertAdam(ps, lr=0.01, eps=1e-8, weight_decay=0.05, bias_correction=True, **impl), grads)
    theirs, _ = run(lambda ps: torch.optim.AdamW(ps, lr=0.01, eps=1e-8, weight_decay=0.05), grads)
    # Same math, different association of the bias-correction factors: a few float32 ulps.
    assert max_abs_diff(ours, theirs) < 5e-6


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_l2_mode_with_bias_correction_is_torch_adam_with_weight_decay(impl):
    grads = grad_sequence(SHAPES, 30)
    ours, _ = run(
        lambda ps: BertAdam(ps, lr=0.01, eps=1e-8, weight_decay=0.1, bias_correction=True, weight_decay_mode="l2", **impl),
        grads,
    )
    theirs, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-8, weight_decay=0.1), grads)
    assert max_abs_diff(ours, theirs) < 5e-6


def test_first_step_without_bias_correction_is_smaller():
    # With m = (1-b1) g and v = (1-b2) g^2, the uncorrected first update is
    # (1-b1)/sqrt(1-b2) = 0.1/0.0316 = 3.16 in size, the corrected one 1 (eps aside).
    p_plain, p_bc = make_params(shapes=[(4,)]), make_params(shapes=[(4,)])
    g = torch.tensor([1.0, -2.0, 3.0, -4.0])
    for params, bc in ((p_plain, False), (p_bc, True)):
        params[0].grad = g.clone()
        BertAdam(params, lr=1.0, weight_decay=0.0, eps=0.0, bias_correction=bc).step()
    start = make_params(shapes=[(4,)])[0].detach()
    step_plain = (start - p_plain[0].detach()).abs()
    step_bc = (start - p_bc[0].detach()).abs()
    torch.testing.assert_close(step_bc, torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(step_plain, torch.full((4,), 0.1 / math.sqrt(0.001)), atol=1e-5, rtol=0)


def test_grad_norm_is_reported_and_clip_uses_tf_formula():
    params = make_params()
    grads = [torch.full(p.shape, 2.0) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = BertAdam(params, lr=0.1, weight_decay=0.0, max_grad_norm=1.0, foreach=False)
    opt.step()
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert opt.last_grad_norm.item() == pytest.approx(expected_norm.item(), rel=1e-6)
    # After clipping, the first moment is (1-b1) * g * c / norm.
    m = opt.state[params[0]]["exp_avg"]
    torch.testing.assert_close(m, torch.full_like(m, 0.1 * 2.0 / expected_norm.item()), rtol=1e-6, atol=0)


# --- implementations ---------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4),
    lr=st.floats(1e-4, 0.1),
    beta1=st.floats(0.0, 0.95),
    beta2=st.floats(0.9, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.floats(0.0, 0.2),
    bias_correction=st.booleans(),
    mode=st.sampled_from(["decoupled", "l2"]),
    clip=st.sampled_from([None, 0.5, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_implementations_agree(shapes, lr, beta1, beta2, eps, weight_decay, bias_correction, mode, clip, seed):
    # fp32, 8 steps: fast paths within 1e-5 absolute (relative to parameters of order 1
    # and lr <= 0.1) of the reference. Differences come from the fused kernel's
    # p*(1-lr*wd) - lr*u versus p - lr*(u + wd*p), and from sqrt/div rounding.
    grads = grad_sequence(shapes, 8, seed=seed)
    kwargs = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                  bias_correction=bias_correction, weight_decay_mode=mode, max_grad_norm=clip)
    ref, ref_opt = run(lambda ps: BertAdam(ps, foreach=False, **kwargs), grads, seed=seed, shapes=shapes)
    for impl in IMPLS[1:]:
        out, opt = run(lambda ps: BertAdam(ps, **impl, **kwargs), grads, seed=seed, shapes=shapes)
        assert max_abs_diff(ref, out) <= 1e-5
        for p_ref, p_out in zip(ref, out):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ref_opt.state[p_ref][key], opt.state[p_out][key], rtol=1e-5, atol=1e-7)
            assert opt.state[p_out]["step"].item() == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_low_precision_params_follow_float32(dtype, impl):
    grads = grad_sequence(SHAPES, 10)
    fp32, _ = run(lambda ps: BertAdam(ps, lr=0.01, max_grad_norm=1.0, foreach=False), grads)
    low, opt = run(lambda ps: BertAdam(ps, lr=0.01, max_grad_norm=1.0, **impl), grads, dtype=dtype)
    assert all(p.dtype == dtype and opt.state[p]["exp_avg"].dtype == dtype for p in low)
    # bf16 keeps 8 bits of mantissa: parameters of order 1 agree to a few bf16 ulps (2^-7).
    tol = 0.05 if dtype == torch.bfloat16 else 5e-3
    assert max_abs_diff(fp32, low) < tol


def test_default_implementation_is_fused_on_cpu_fp32():
    assert choose_implementation(make_params(), None, None) == "fused"
    assert choose_implementation(make_params(), False, None) == "reference"
    assert choose_implementation(make_params(), True, None) == "foreach"


# --- state ---------------------------------------------------------------------------


def test_state_names_are_torchs_and_adamw_checkpoints_load_both_ways():
    grads = grad_sequence(SHAPES, 5)
    _, adamw = run(lambda ps: torch.optim.AdamW(ps, lr=0.01), grads)
    params, ours = run(lambda ps: BertAdam(ps, lr=0.01), grads)
    assert set(ours.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    fresh = BertAdam(make_params(), lr=0.01)
    fresh.load_state_dict(adamw.state_dict())
    assert fresh.param_groups[0]["bias_correction"] is False
    assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"],
                       adamw.state[adamw.param_groups[0]["params"][0]]["exp_avg"])
    back = torch.optim.AdamW(make_params(), lr=0.01)
    back.load_state_dict(ours.state_dict())
    assert back.state[back.param_groups[0]["params"][0]]["step"].item() == 5


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(eps=-1e-6), "eps must be >= 0"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(betas=(1.0, 0.999)), "betas[0] must be in [0, 1)"),
        (dict(betas=(0.9, -0.1)), "betas[1] must be in [0, 1)"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(weight_decay_mode="adamw"), "weight_decay_mode must be one of"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),
        (dict(foreach=True, fused=True), "foreach and fused cannot both be True"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as info:
        BertAdam(make_params(), **kwargs)
    assert words in str(info.value)


def test_invalid_param_group_added_later_is_rejected():
    opt = BertAdam(make_params()[:2])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": make_params()[2:], "lr": -0.1})
