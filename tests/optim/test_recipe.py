"""create_optimizer: Google's recipe wired together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bertopt


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)

    def forward(self, x):
        return self.LayerNorm(self.dense(x))


def test_google_defaults():
    model = Tiny()
    opt, sched = bertopt.create_optimizer(model, 1e-3, num_train_steps=100, num_warmup_steps=10)
    assert isinstance(opt, bertopt.BertAdam)
    assert opt.max_grad_norm == 1.0
    decayed, plain = opt.param_groups
    assert decayed["param_names"] == ["dense.weight"] and decayed["weight_decay"] == 0.01
    assert sorted(plain["param_names"]) == ["LayerNorm.bias", "LayerNorm.weight", "dense.bias"]
    assert plain["weight_decay"] == 0.0
    for group in opt.param_groups:
        assert group["eps"] == 1e-6 and group["betas"] == (0.9, 0.999)
        assert group["bias_correction"] is False and group["weight_decay_mode"] == "decoupled"
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert lrs[0] == 0.0  # the first update uses LR 0
    assert lrs[5] == pytest.approx(1e-3 * 5 / 10, rel=1e-6)
    assert lrs[10] == pytest.approx(1e-3 * (1 - 10 / 100), rel=1e-6)  # google style: decay from step 0


def test_overrides_are_forwarded_and_warmup_defaults_to_proportion():
    opt, sched = bertopt.create_optimizer(Tiny(), 1e-3, 200, foreach=True, weight_decay=0.0, max_grad_norm=None)
    assert opt.param_groups[0]["foreach"] is True
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert opt.max_grad_norm is None
    # warmup = int(200 * 0.1) = 20: LR reaches the peak at step 20
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 20 / 200), rel=1e-6)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        bertopt.create_optimizer(Tiny(), 1e-3, 10, 1, optimizer="sgd")
