"""Property-based checks of the optimizers over random shapes, dtypes, hyperparameters and
param-group layouts (issue 7, item 1): what must hold whatever the input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bertopt

IMPLS = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Parity tolerance against the float32 reference, per dtype, after a few steps on
# parameters of order 1: fp32 1e-5; 16-bit: a few ulps of the dtype. Absolute up to
# magnitude 1, relative above (an ulp grows with the value: bf16's is 2^-6 at 2.4).
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

OPTIMIZERS = {"BertAdam": bertopt.BertAdam}
if hasattr(bertopt, "Lamb"):
    OPTIMIZERS["Lamb"] = bertopt.Lamb

shape = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)  # includes zero-size and 0-dim


@st.composite
def problems(draw):
    """Parameters split into 1-3 groups with their own hyperparameters, and gradients."""
    shapes = draw(st.lists(shape, min_size=1, max_size=5))
    n_groups = draw(st.integers(1, min(3, len(shapes))))
    group_of = [i % n_groups for i in range(len(shapes))]
    group_hyper = [
        dict(lr=draw(st.floats(0.0, 0.05)), weight_decay=draw(st.sampled_from([0.0, 0.01, 0.1])))
        for _ in range(n_groups)
    ]
    return dict(
        shapes=shapes, group_of=group_of, group_hyper=group_hyper,
        optimizer=draw(st.sampled_from(sorted(OPTIMIZERS))),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        clip=draw(st.sampled_from([None, 0.5, 1.0])),
        betas=(draw(st.floats(0.0, 0.95)), draw(st.floats(0.9, 0.999))),
        no_grad=draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes))),
        seed=draw(st.integers(0, 10_000)),
    )


def build(problem, impl, dtype=None):
    dtype = dtype or DTYPES[problem["dtype"]]
    gen = torch.Generator().manual_seed(problem["seed"])
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in problem["shapes"]]
    groups = [
        {"params": [p for p, g in zip(params, problem["group_of"]) if g == k], **hyper}
        for k, hyper in enumerate(problem["group_hyper"])
    ]
    opt = OPTIMIZERS[problem["optimizer"]](groups, betas=problem["betas"], max_grad_norm=problem["clip"], **IMPLS[impl])
    return params, opt


def set_grads(problem, params, step, dtype=None):
    gen = torch.Generator().manual_seed(problem["seed"] * 100 + step)
    for p, skip in zip(params, problem["no_grad"]):
        g = torch.randn(p.shape, generator=gen) * (0.1 + step % 3)
        p.grad = None if skip else g.to(dtype or p.dtype)


def run(problem, impl, steps=4, dtype=None):
    params, opt = build(problem, impl, dtype)
    for k in range(steps):
        set_grads(problem, params, k, dtype)
        opt.step()
    return params, opt


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(problems())
def test_fast_paths_agree_with_the_float32_reference(problem):
    dtype = DTYPES[problem["dtype"]]
    ref, _ = run(problem, "reference", dtype=torch.float32)
    for impl in ("foreach", "fused"):
        out, _ = run(problem, impl)
        for a, b in zip(ref, out):
            assert b.dtype == dtype
            if a.numel():
                scale = max(1.0, a.detach().abs().max().item())
                assert (a.detach() - b.detach().float()).abs().max().item() <= TOL[dtype] * scale


@SETTINGS
@given(problems(), st.sampled_from(sorted(IMPLS)))
def test_state_dict_round_trip_resumes_bit_exactly(problem, impl):
    straight, _ = run(problem, impl, steps=6)
    params, opt = run(problem, impl, steps=3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # Built with other hyperparameters: those of the checkpoint must win.
    other = dict(problem, clip=0.25 if problem["clip"] is None else None,
                 group_hyper=[dict(lr=0.5, weight_decay=0.3) for _ in problem["group_hyper"]])
    params2, opt2 = build(other, impl)
    with torch.no_grad():
        for p, value in zip(params2, saved["params"]):
            p.copy_(value)
    opt2.load_state_dict(saved["opt"])
    assert opt2.max_grad_norm == problem["clip"]
    for k in range(3, 6):
        set_grads(problem, params2, k)
        opt2.step()
    for a, b in zip(straight, params2):
        assert torch.equal(a, b)


@SETTINGS
@given(problems(), st.sampled_from(sorted(IMPLS)), st.sampled_from([math.inf, -math.inf, math.nan]))
def test_non_finite_gradient_changes_nothing(problem, impl, bad):
    params, opt = run(problem, impl, steps=2)
    with_grad = [p for p, skip in zip(params, problem["no_grad"]) if not skip and p.numel()]
    if not with_grad:
        return
    before = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
    set_grads(problem, params, 2)
    with_grad[-1].grad.view(-1)[0] = bad
    opt.step()
    assert opt.skipped_steps == 1 and not math.isfinite(opt.last_grad_norm.item())
    state_after = opt.state_dict()
    for a, b in zip(before[1], params):
        assert torch.equal(a, b.detach())
    for key, state in before[0]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, state_after["state"][key][name]), name


@SETTINGS
@given(problems(), st.sampled_from(sorted(IMPLS)))
def test_zero_gradients_move_only_decayed_parameters(problem, impl):
    params, opt = build(problem, impl)
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.skipped_steps == 0 and opt.last_grad_norm.item() == 0.0
    for group in opt.param_groups:
        for p in group["params"]:
            i = next(k for k, q in enumerate(params) if q is p)
            moved = not torch.equal(start[i], p.detach())
            if group["weight_decay"] == 0 or group["lr"] == 0 or p.numel() == 0:
                assert not moved
            assert torch.isfinite(p.detach().float()).all()


@SETTINGS
@given(problems())
def test_param_group_added_later_is_trained_like_one_given_at_construction(problem):
    dtype = DTYPES[problem["dtype"]]
    together, _ = run(problem, "reference")
    params, opt = build(problem, "reference")
    last = opt.param_groups.pop()  # rebuild the last group through add_param_group
    opt.add_param_group({k: v for k, v in last.items() if k in ("params", "lr", "weight_decay")})
    for k in range(4):
        set_grads(problem, params, k)
        opt.step()
    for a, b in zip(together, params):
        assert torch.equal(a, b), dtype


@SETTINGS
@given(problems().filter(lambda p: p["optimizer"] == "BertAdam" and p["dtype"] == "fp32"))
def test_adamw_state_dict_loads_and_continues(problem):
    params_a, ours_a = build(problem, "reference")
    adamw = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in ours_a.param_groups],
        betas=problem["betas"], eps=1e-6,
    )
    for k in range(3):
        set_grads(problem, params_a, k)
        adamw.step()
    params_b, ours = build(problem, "fused")
    with torch.no_grad():
        for a, b in zip(params_a, params_b):
            b.copy_(a)
    ours.load_state_dict(adamw.state_dict())
    for p_a, p_b in zip(params_a, params_b):
        if p_a in adamw.state:
            for name in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(ours.state[p_b][name].cpu(), adamw.state[p_a][name].cpu())
    set_grads(problem, params_b, 3)
    ours.step()
    assert all(torch.isfinite(p.detach()).all() for p in params_b)


# --- the same contract for every optimizer, on fixed inputs ---------------------------------


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_parameters_without_grad_are_left_alone(name):
    torch.manual_seed(0)
    trained, idle = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    start = idle.detach().clone()
    trained.grad = torch.ones_like(trained)
    opt = OPTIMIZERS[name]([trained, idle], lr=0.1)
    opt.step()
    assert idle not in opt.state and torch.equal(idle.detach(), start)
    assert trained in opt.state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grad_scaler_gives_the_unscaled_result(name):
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    opt, opt_twin = OPTIMIZERS[name](model.parameters(), lr=0.01), OPTIMIZERS[name](twin.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(5):
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        opt_twin.step()
        opt_twin.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sparse_gradients_are_rejected(name):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = OPTIMIZERS[name](emb.parameters())
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_torch_compile_of_a_training_step(name):
    optimizer_class = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    eager = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    eager.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    opt = optimizer_class(model.parameters(), lr=0.01, max_grad_norm=1.0)
    opt_eager = optimizer_class(eager.parameters(), lr=0.01, max_grad_norm=1.0)

    def train_step(m, o):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        o.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(3):
        compiled(model, opt)
        train_step(eager, opt_eager)
    for a, b in zip(model.parameters(), eager.parameters()):
        assert (a - b).abs().max().item() < 1e-6
