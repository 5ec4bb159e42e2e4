"""How accurate the native norm pass is (csrc/norm.c: float32 sums of 32 squares per lane,
blocks of 256 added in double), against a float64 norm, on tensors as large as BERT's
word embedding (23.4M elements). torch's float32 CPU norm reads low there by ~1e-3."""

from __future__ import annotations

import math

import pytest
import torch

from bertopt.optim.clip import global_grad_norm
from bertopt.optim.native import build, kernels

WORD_EMBEDDING = 30522 * 768  # 23.4M


def float64_norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


@pytest.mark.skipif(build.library() is None, reason=f"native kernels unavailable: {build.status()}")
@pytest.mark.parametrize("kind", ["normal", "uniform-positive", "wide-range"])
def test_native_norm_is_accurate_on_large_tensors(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "normal":
        x = torch.randn(WORD_EMBEDDING, generator=gen) * 1e-3
    elif kind == "uniform-positive":  # every square of one sign and size: rounding errors do not cancel
        x = torch.rand(WORD_EMBEDDING, generator=gen) + 1.0
    else:  # magnitudes over 12 orders
        x = torch.randn(WORD_EMBEDDING, generator=gen) * torch.pow(10.0, torch.rand(WORD_EMBEDDING, generator=gen) * 12 - 9)
    tensors = [x, torch.randn(768, generator=gen)]
    exact = float64_norm(tensors)
    ours = math.sqrt(kernels.sum_of_squares(build.library(), tensors))
    through_the_optimizer = float(global_grad_norm(tensors))  # rounded to float32 at the end
    torch_fp32 = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))
    print(f"[norm accuracy, {kind}] ours {abs(ours / exact - 1):.2e}, torch float32 {abs(torch_fp32 / exact - 1):.2e}")
    assert abs(ours / exact - 1) < 1e-7  # bound from csrc/norm.c; measured 4e-13 .. 4e-9
    assert abs(through_the_optimizer / exact - 1) < 1.2e-7  # + one float32 rounding
