"""One ``.grad`` contract for every path: after ``step()``, ``.grad`` is what backward left
there. The clip coefficient is folded into the update and gradients are only read; torch's
fused kernel (which stores the scaled gradient back into what it is handed) gets copies.

Also: the torch-fused path (the one GPUs take) makes no host synchronisation, skip
included, and the native kernels really run where they should."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch

import bertopt
from bertopt.optim.native import build, kernels

# path name -> (constructor options, native kernels on?)
PATHS = {
    "reference": (dict(foreach=False, fused=False), True),
    "foreach": (dict(foreach=True), True),
    "fused-native": (dict(fused=True), True),
    "fused-torch": (dict(fused=True), False),
}
NATIVE_CALLS = {"BertAdam": ("adam",), "Lamb": ("lamb_step", "lamb_moments")}


def make_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in [(300, 40), (40,), (7, 3)]]


def native_switch(on: bool):
    return contextlib.nullcontext() if on else mock.patch.object(build, "library", lambda: None)


@pytest.mark.parametrize("clip", [1.0, None])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("optimizer", ["BertAdam", "Lamb"])
def test_grad_is_unchanged_after_step(optimizer, path, clip):
    options, native = PATHS[path]
    if path == "fused-native" and build.library() is None:
        pytest.skip(build.status())
    params = make_params()
    groups = [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]  # adapted and not (LAMB)
    opt = getattr(bertopt, optimizer)(groups, lr=0.01, max_grad_norm=clip, **options)
    before = dict(kernels.calls)
    with native_switch(native):
        for step in range(2):
            grads = [torch.randn(p.shape) * 10 for p in params]  # norm >> 1: the clip acts
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            for p, g in zip(params, grads):
                assert torch.equal(p.grad, g), (optimizer, path, step)
    ran_native = sum(kernels.calls[k] - before.get(k, 0) for k in NATIVE_CALLS[optimizer])
    assert (ran_native > 0) == (path == "fused-native")


@pytest.mark.parametrize("optimizer", ["BertAdam", "Lamb"])
def test_grad_is_unchanged_on_the_16_bit_fused_path(optimizer):
    params = make_params(torch.bfloat16)
    opt = getattr(bertopt, optimizer)(params, lr=0.01, max_grad_norm=1.0, fused=True)
    grads = [(torch.randn(p.shape) * 10).to(torch.bfloat16) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


# --- the torch-fused path makes no host synchronisation --------------------------------------

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy")


@contextlib.contextmanager
def counting_host_reads():
    """Count Python-level reads of tensor values into the host (what synchronises a GPU)."""
    counts = {name: 0 for name in HOST_READS}
    patches = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        patches.append(mock.patch.object(torch.Tensor, name, counted))
    for p in patches:
        p.start()
    try:
        yield counts
    finally:
        for p in patches:
            p.stop()


def test_the_counter_sees_a_host_read():
    with counting_host_reads() as counts:
        if torch.tensor(1.0) > 0:
            torch.tensor(2.0).item()
    assert counts["__bool__"] == 1 and counts["item"] == 1


@pytest.mark.parametrize("finite", [True, False])
@pytest.mark.parametrize("optimizer", ["BertAdam", "Lamb"])
def test_torch_fused_step_makes_no_host_read(optimizer, finite):
    params = make_params()
    opt = getattr(bertopt, optimizer)(params, lr=0.01, max_grad_norm=1.0, fused=True)
    with native_switch(False):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()  # state exists
        before = [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]
        for p in params:
            p.grad = torch.randn(p.shape)
        if not finite:
            params[1].grad[3] = math.inf
        with counting_host_reads() as counts:
            opt.step()
        assert sum(counts.values()) == 0, counts
    after = [t for p in params for t in (p.detach(), *opt.state[p].values())]
    unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
    assert unchanged == (not finite)
    assert opt.skipped_steps == (0 if finite else 1)  # read (synchronised) only when asked for
    assert all(opt.state[p]["step"].item() == (2 if finite else 1) for p in params)
    # the count survives a checkpoint
    fresh = getattr(bertopt, optimizer)(make_params(), lr=0.01, max_grad_norm=1.0, fused=True)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == opt.skipped_steps
