"""create_optimizer(optimizer="lamb"): NVIDIA's BERT LAMB recipe, also reachable from the CLI flags."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bertopt
from bertopt import Lamb


class TinyBert(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(6, 6)
        self.LayerNorm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.LayerNorm(torch.tanh(self.dense(x))))


def nvidia_poly_warmup(step, lr, warmup_proportion, total_steps, degree=0.5):
    """DeepLearningExamples PyTorch/LanguageModeling/BERT/schedulers.py PolyWarmUpScheduler.get_lr
    (its warmup is a fraction of total_steps)."""
    progress = step / total_steps
    if progress < warmup_proportion:
        return lr * progress / warmup_proportion
    return lr * (1.0 - progress) ** degree


def test_lamb_recipe_optimizer_and_groups():
    model = TinyBert()
    opt, _ = bertopt.create_optimizer(model, 6e-3, 100, 10, optimizer="lamb")
    assert isinstance(opt, Lamb)
    assert opt.max_grad_norm == 1.0
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert set(plain["param_names"]) == {"dense.bias", "LayerNorm.weight", "LayerNorm.bias", "out.bias"}
    assert decayed["bias_correction"] is True and decayed["always_adapt"] is False and decayed["trust_clip"] is None
    assert decayed["eps"] == 1e-6


def test_lamb_recipe_schedule_is_nvidias_poly_warmup():
    total, warmup_proportion, lr = 200, 0.1, 6e-3
    opt, scheduler = bertopt.create_optimizer(TinyBert(), lr, total, int(total * warmup_proportion), optimizer="lamb")
    for step in range(0, total + 20):
        expected = 0.0 if step >= total else nvidia_poly_warmup(step, lr, warmup_proportion, total)
        assert scheduler.lr_at(step)[0] == pytest.approx(expected, rel=1e-12, abs=1e-15), step
    # the LR drops at the end of warmup (decay counted from step 0): lr * 0.9 ** 0.5
    assert scheduler.lr_at(20)[0] == pytest.approx(lr * 0.9**0.5)


def test_lamb_recipe_rebased_schedule_starts_decay_at_the_peak():
    _, scheduler = bertopt.create_optimizer(TinyBert(), 1e-3, 100, 10, optimizer="lamb", schedule_style="rebased")
    assert scheduler.lr_at(10)[0] == pytest.approx(1e-3)
    assert scheduler.lr_at(55)[0] == pytest.approx(1e-3 * 0.5**0.5)


def test_lamb_recipe_training_steps_equal_hand_wiring():
    torch.manual_seed(0)
    model, twin = TinyBert(), TinyBert()
    twin.load_state_dict(model.state_dict())
    opt, scheduler = bertopt.create_optimizer(model, 0.05, 20, 2, optimizer="lamb")
    groups = bertopt.param_groups(twin, weight_decay=0.01)
    hand = Lamb(groups, lr=0.05, weight_decay=0.01, max_grad_norm=1.0)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for step in range(6):
        lr = nvidia_poly_warmup(step, 0.05, 2 / 20, 20)
        for group in hand.param_groups:
            group["lr"] = lr
        for m, o in ((model, opt), (twin, hand)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
        scheduler.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), TinyBert().parameters()))


def test_lamb_recipe_overrides_go_to_lamb():
    opt, _ = bertopt.create_optimizer(TinyBert(), 1e-3, 10, 1, optimizer="lamb", always_adapt=True,
                                      trust_clip=(0.0, 1.0), foreach=True)
    assert opt.param_groups[0]["always_adapt"] is True and opt.param_groups[0]["trust_clip"] == (0.0, 1.0)


def test_lamb_recipe_rejects_l2_decay():
    with pytest.raises(ValueError, match="weight_decay_mode='l2' is for optimizer='adam'"):
        bertopt.create_optimizer(TinyBert(), 1e-3, 10, 1, optimizer="lamb", weight_decay_mode="l2")
    opt, _ = bertopt.create_optimizer(TinyBert(), 1e-3, 10, 1, optimizer="lamb", weight_decay_mode="decoupled")
    assert isinstance(opt, Lamb)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adam', 'lamb'\)"):
        bertopt.create_optimizer(TinyBert(), 1e-3, 10, 1, optimizer="sgd")


def test_cli_flags_reach_lamb():
    from bertopt.cli import build_parser, config_from_args
    from bertopt.train.command import build_optimizer

    args = build_parser().parse_args(["pretrain", "--optimizer", "lamb", "--warmup-steps", "3", "--lr", "2e-3"])
    opt, scheduler = build_optimizer(TinyBert(), config_from_args("pretrain", args).optim, num_train_steps=30)
    assert isinstance(opt, Lamb) and opt.max_grad_norm == 1.0
    assert scheduler.lr_at(15)[0] == pytest.approx(2e-3 * 0.5**0.5)
