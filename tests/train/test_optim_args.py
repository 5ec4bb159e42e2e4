"""The shared optimizer flags: bias correction follows the optimizer unless the flag says otherwise."""

from __future__ import annotations

import argparse

import pytest
import torch

import bertopt
from bertopt.train.optim_args import add_optimizer_arguments, build_optimizer, optimizer_settings


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser, lr=1e-3, batch_size=8)
    return parser.parse_args(list(argv))


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
    assert optimizer_settings(args)["bias_correction"] is expected


def test_l2_mode_with_lamb_is_rejected_early():
    with pytest.raises(ValueError, match="--weight-decay-mode l2 is for --optimizer adam"):
        build_optimizer(torch.nn.Linear(3, 3), parse("--optimizer", "lamb", "--weight-decay-mode", "l2"), 10)
