"""The shared optimizer flags (parsed into an OptimConfig): bias correction follows the optimizer
unless the flag says otherwise."""

from __future__ import annotations

import pytest
import torch

import bertopt
from bertopt.cli import build_parser, config_from_args
from bertopt.train.command import build_optimizer


def parse(*argv):
    return config_from_args("pretrain", build_parser().parse_args(["pretrain", "--batch-size", "8", *argv])).optim


@pytest.mark.parametrize("argv, optimizer_type, expected", [
    ((), bertopt.BertAdam, False),
    (("--bias-correction",), bertopt.BertAdam, True),
    (("--optimizer", "lamb"), bertopt.Lamb, True),
    (("--optimizer", "lamb", "--no-bias-correction"), bertopt.Lamb, False),
])
def test_bias_correction_default_is_the_optimizers(argv, optimizer_type, expected):
    args = parse(*argv)
    optimizer, _ = build_optimizer(torch.nn.Linear(3, 3), args, 10)
    assert isinstance(optimizer, optimizer_type)
    assert all(group["bias_correction"] is expected for group in optimizer.param_groups)
    assert args.settings()["bias_correction"] is expected


def test_l2_mode_with_lamb_is_rejected_early():
    with pytest.raises(ValueError, match="--weight-decay-mode l2 is for --optimizer adam"):
        parse("--optimizer", "lamb", "--weight-decay-mode", "l2")


def test_finetune_defaults_to_bias_correction_at_1e4_and_flags_give_berts_recipe(capsys):
    def finetune(*argv):
        return config_from_args("finetune", build_parser().parse_args(["finetune", *argv])).optim

    default = finetune()
    assert (default.optimizer, default.lr, default.uses_bias_correction) == ("adam", 1e-4, True)
    optimizer, _ = build_optimizer(torch.nn.Linear(3, 3), default, 10)
    assert all(group["bias_correction"] is True for group in optimizer.param_groups)
    bert = finetune("--no-bias-correction", "--lr", "2.5e-5")
    assert (bert.lr, bert.uses_bias_correction) == (2.5e-5, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    assert "(default: on, from docs/study.md)" in " ".join(capsys.readouterr().out.split())
