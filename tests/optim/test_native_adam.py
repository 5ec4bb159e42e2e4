"""The native CPU kernel behind BertAdam's fused path (bertopt/optim/csrc, bertopt/optim/native), and its
fallback to torch's fused kernel: exactness against the reference, thread-count
independence, what it leaves untouched, and what happens without a compiler."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import bertopt
from bertopt.optim import _adam
from bertopt.optim.native import build, kernels

needs_compiler = pytest.mark.skipif(
    build.library() is None, reason=f"native kernel unavailable: {build.status()}"
)

# Sizes cross the kernel's work-item boundary (_CHUNK) and include empty and 0-dim tensors.
SHAPES = [(kernels.CHUNK + 3,), (37, 5), (), (0,), (4, 0), (1000,)]


def make_state(seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn(s, generator=gen) for s in shapes]
    m = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    v = [0.01 * torch.rand(s, generator=gen) for s in shapes]
    steps = [torch.tensor(4.0) for _ in shapes]
    return p, g, m, v, steps


def clone_all(state):
    return [[t.clone() for t in lst] for lst in state]


@pytest.fixture
def native_on():
    previous = build.use_native(True)
    yield
    build.use_native(previous)


@needs_compiler
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("clip", [None, 0.37, 1.0])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_native_step_is_the_reference_up_to_torchs_sqrt(native_on, decoupled, bias_correction, clip, weight_decay):
    h = _adam.AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=weight_decay,
                        bias_correction=bias_correction, decoupled=decoupled)
    clip_coef = None if clip is None else torch.tensor(clip)
    ref = make_state(0)
    nat = clone_all(ref)
    _adam.bert_adam_reference(*ref, h, clip_coef)
    _adam.bert_adam_fused(*nat, h, clip_coef)
    p_ref, g_ref, m_ref, v_ref, s_ref = ref
    p_nat, g_nat, m_nat, v_nat, s_nat = nat
    for i in range(len(SHAPES)):
        # Same float32 operations in the same order: the moments are bit-identical.
        assert torch.equal(m_ref[i], m_nat[i]) and torch.equal(v_ref[i], v_nat[i])
        assert torch.equal(g_ref[i], g_nat[i])  # .grad is read, never written
        assert torch.equal(s_ref[i], s_nat[i])
        # The only difference: torch's CPU sqrt (MKL) is not always correctly rounded, ours
        # is; one ulp in sqrt(v) is at most ~2^-23 relative in the update u, so p may move
        # by lr*|u|*2^-22 plus its own rounding (one ulp of p).
        m_hat = m_ref[i] / (1 - 0.9**5) if bias_correction else m_ref[i]
        v_hat = v_ref[i] / (1 - 0.999**5) if bias_correction else v_ref[i]
        u = (m_hat / (v_hat.sqrt() + h.eps)).abs() + weight_decay * p_ref[i].abs()
        bound = h.lr * u * 2.0**-22 + torch.finfo(torch.float32).eps * p_ref[i].abs()
        assert torch.all((p_ref[i] - p_nat[i]).abs() <= bound)


@needs_compiler
def test_native_result_does_not_depend_on_thread_count(native_on):
    h = _adam.AdamHyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                        bias_correction=False, decoupled=True)
    shapes = [(3 * kernels.CHUNK + 11,), (kernels.CHUNK,), (768,)]
    results, norms = [], []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            state = make_state(1, shapes)
            norms.append(kernels.sum_of_squares(build.library(), state[1]))
            _adam.bert_adam_fused(*state, h, torch.tensor(0.5))
            results.append(state)
    finally:
        torch.set_num_threads(threads)
    assert norms[0] == norms[1] == norms[2]  # partial sums are added in a fixed order
    for other in results[1:]:
        for a_list, b_list in zip(results[0], other):
            assert all(torch.equal(a, b) for a, b in zip(a_list, b_list))


@needs_compiler
def test_sum_of_squares_matches_float64(native_on):
    tensors = make_state(2)[1]
    expected = sum(float(t.double().pow(2).sum()) for t in tensors)
    got = kernels.sum_of_squares(build.library(), tensors)
    # float32 sums of 32 squares per lane, blocks added in double (csrc/norm.c): was 1e-12 when
    # every square was summed in double, which made the pass compute-bound
    # (tests/optim/test_norm_accuracy.py: large tensors)
    assert math.isclose(got, expected, rel_tol=1e-7)
    assert math.isinf(kernels.sum_of_squares(build.library(), [torch.tensor([1.0, math.inf])]))
    assert math.isnan(kernels.sum_of_squares(build.library(), [torch.tensor([1.0, math.nan])]))


@needs_compiler
def test_every_kernel_refuses_a_struct_of_another_version(native_on, monkeypatch):
    # Each entry point, the norm's included, checks bertopt_hyper's version before touching
    # memory: a mismatch is an error, not a wrong sum or a write through a misread struct.
    lib = build.library()
    p, g, m, v, _ = make_state(3, shapes=[(1000,), (7, 3)])
    before = clone_all([p, g, m, v])
    h = _adam.AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=False,
                        decoupled=True)
    monkeypatch.setattr(kernels, "ABI_VERSION", kernels.ABI_VERSION + 1)
    calls = {
        "sumsq": lambda: kernels.sum_of_squares(lib, g),
        "adam": lambda: kernels.adam_step(lib, p, g, m, v, None, h, 0.5),
        "lamb_moments": lambda: kernels.lamb_moments(lib, p, g, m, v, None, h, 0.5, apply_scales=None),
        "lamb_apply": lambda: kernels.lamb_apply(lib, p, m, v, None, h, torch.ones(2)),
        "lamb_step": lambda: kernels.lamb_step(lib, p, g, m, v, None, h, 0.5, None),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"kernel {name}: ABI version mismatch"):
            call()
    assert all(torch.equal(a, b) for xs, ys in zip(before, [p, g, m, v]) for a, b in zip(xs, ys))


@needs_compiler
@pytest.mark.parametrize("n", [1, 255, 256, 4 * 256 - 1, 4 * 256 * 5 + 3 * 256 + 100, (1 << 18) + 4097])
def test_sum_of_squares_reads_every_element_once(native_on, n):
    # A span is read as four streams of blocks, then leftover blocks, then single elements
    # (csrc/norm.c): with ones the sum is n exactly, and one element set to 3 adds exactly 8
    # wherever it is, so an element read twice or skipped cannot go unnoticed.
    lib = build.library()
    assert kernels.sum_of_squares(lib, [torch.ones(n)]) == n
    for k in sorted({0, n // 4, n // 2, n - 257, n - 1} & set(range(n))):
        x = torch.ones(n)
        x[k] = 3.0
        assert kernels.sum_of_squares(lib, [x, torch.ones(3)]) == n + 8 + 3, k


@needs_compiler
def test_native_step_bumps_version_counters_like_an_inplace_op(native_on):
    # Autograd uses _version to refuse a backward through tensors changed since the forward.
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = bertopt.BertAdam([w], lr=0.1, fused=True)
    loss = (w * w).sum()  # saves w for backward
    loss.backward(retain_graph=True)
    before = w._version
    opt.step()
    assert w._version > before
    assert opt.state[w]["exp_avg"]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def clipped_bert_adam_run(steps=3):
    """BertAdam(fused=True) with clipping active; returns params, grads of the last step, opt."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(64, 32), (32,)]]
    opt = bertopt.BertAdam(params, lr=0.01, max_grad_norm=1.0, fused=True)
    for _ in range(steps):
        grads = [10 * torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, grads, opt


@needs_compiler
def test_fused_path_uses_native_kernel_and_falls_back_to_torchs(native_on):
    calls = kernels.calls["adam"]
    native_params, native_grads, _ = clipped_bert_adam_run()
    assert kernels.calls["adam"] == calls + 3
    # .grad is what backward left there (on every path: tests/optim/test_grad_contract.py).
    assert all(torch.equal(p.grad, g) for p, g in zip(native_params, native_grads))
    build.use_native(False)
    assert build.library() is None and "use_native(False)" in build.status()
    torch_params, torch_grads, opt = clipped_bert_adam_run()
    assert kernels.calls["adam"] == calls + 3  # torch's kernel ran
    assert all(torch.equal(p.grad, g) for p, g in zip(torch_params, torch_grads))
    for a, b in zip(native_params, torch_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_a_compiler_the_fused_path_is_torchs(monkeypatch, tmp_path, native_on):
    monkeypatch.delenv("BERTOPT_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("BERTOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    build.reset_for_tests()
    try:
        assert build.library() is None
        assert "no C compiler" in build.status()
        calls = kernels.calls["adam"]
        params, grads, opt = clipped_bert_adam_run()
        assert kernels.calls["adam"] == calls
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    finally:
        monkeypatch.undo()
        build.reset_for_tests()


def test_a_broken_compiler_is_reported_not_raised(monkeypatch, tmp_path, native_on):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable")
    monkeypatch.delenv("BERTOPT_NATIVE", raising=False)
    monkeypatch.setenv("CC", false)
    monkeypatch.setenv("BERTOPT_CACHE_DIR", str(tmp_path))
    build.reset_for_tests()
    try:
        assert build.library() is None
        assert "compiling the native kernel failed" in build.status()
    finally:
        monkeypatch.undo()
        build.reset_for_tests()


def test_environment_switch_turns_the_kernel_off(monkeypatch, native_on):
    monkeypatch.setenv("BERTOPT_NATIVE", "0")
    build.reset_for_tests()
    try:
        assert build.library() is None
        assert "BERTOPT_NATIVE=0" in build.status()
    finally:
        monkeypatch.undo()
        build.reset_for_tests()


def test_only_plain_contiguous_float32_cpu_tensors_are_eligible():
    x = torch.zeros(4, 4)
    assert kernels.eligible([x], [torch.nn.Parameter(x.clone())])
    assert not kernels.eligible([x.t()])  # not contiguous
    assert not kernels.eligible([x.half()])
    assert not kernels.eligible([x.to_sparse()])
    assert not kernels.eligible([x], [x.double()])


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_take_torchs_kernel(native_on, dtype):
    params = [torch.nn.Parameter(torch.randn(8, 4).to(dtype))]
    opt = bertopt.BertAdam(params, lr=0.01, max_grad_norm=1.0, fused=True)
    params[0].grad = (10 * torch.randn(8, 4)).to(dtype)
    g = params[0].grad.clone()
    opt.step()
    assert params[0].dtype == dtype and opt.state[params[0]]["exp_avg"].dtype == dtype
    assert torch.equal(params[0].grad, g)  # torch's kernel got a copy: .grad is unchanged


@needs_compiler
@pytest.mark.parametrize("optimizer", ["BertAdam", "Lamb"])
def test_state_of_the_wrong_size_is_refused_not_written_out_of_bounds(native_on, optimizer):
    # e.g. optimizer state loaded from a checkpoint of another model (load_state_dict does not check)
    p = torch.nn.Parameter(torch.randn(10))
    opt = getattr(bertopt, optimizer)([p], lr=0.1, fused=True)
    p.grad = torch.randn(10)
    opt.step()
    before = p.detach().clone()
    opt.state[p]["exp_avg_sq"] = torch.zeros(4)
    with pytest.raises(ValueError, match="exp_avg_sq must match its parameter in size: parameter 0 has 10 elements"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p]["step"].item() == 1


@needs_compiler
def test_portable_build_without_march_native_matches_too(tmp_path):
    # The fallback compile (when a compiler refuses -march=native): baseline ISA, and on
    # x86-64 without FMA a*b+c instead of fused multiply-adds, as torch's own fallback.
    import ctypes

    cc = build.find_compiler()
    out = tmp_path / "portable.so"
    assert build.compile_library(cc, out, build.BASE_FLAGS) is None
    lib = ctypes.CDLL(str(out))
    kernels.declare(lib)
    h = _adam.AdamHyper(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                        bias_correction=False, decoupled=True)
    ref = make_state(5)
    nat = clone_all(ref)
    _adam.bert_adam_reference(*ref, h, torch.tensor(0.5))
    kernels.adam_step(lib, *nat[:4], None, h, 0.5)
    for lst_ref, lst_nat in zip(ref[:4], nat[:4]):
        for a, b in zip(lst_ref, lst_nat):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
