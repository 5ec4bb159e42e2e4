"""`bertopt pretrain --help` / `finetune --help`: readable metavars, and each flag's help is its
config field's documentation (one source)."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest

from bertopt.cli import build_parser
from bertopt.train.config import FinetuneConfig, OptimConfig, PretrainConfig, RunConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_help_shows_no_internal_names(command):
    text = _subparser(command).format_help()
    dotted = re.findall(r"\b[A-Z][A-Z_]*\.[A-Z][A-Z_]*\b", text)  # TASK.PRESET, OPTIM.LR, RUN.BATCH_SIZE
    assert dotted == []
    assert "--lr LR" in text and "--batch-size BATCH_SIZE" in text and "--out OUT" in text


@pytest.mark.parametrize("command, config_class", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_every_flag_is_documented_by_its_config_field(command, config_class):
    classes = {"optim": OptimConfig, "run": RunConfig, "task": config_class}
    documented = {(section, f.name): f.metadata.get("help", "") for section, cls in classes.items() for f in fields(cls)}
    flags = [a for a in _subparser(command)._actions if "." in (a.dest or "")]
    assert len(flags) > 25
    for action in flags:
        section, name = action.dest.split(".", 1)
        assert documented[(section, name)], f"{action.option_strings} has no documentation on its config field"
        assert action.help.startswith(documented[(section, name)]), action.option_strings
