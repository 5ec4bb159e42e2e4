"""A checkpoint written by an older bertopt (old_checkpoint/, see make_old_checkpoint.py there)
still resumes, and the resumed run logs the curve the old code logged without stopping."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from _corpus import write_corpus
from bertopt.cli import main as cli
from bertopt.train.report import read_metrics

FIXTURE = Path(__file__).parent / "old_checkpoint"
sys.path.insert(0, str(FIXTURE))

from make_old_checkpoint import DOCUMENTS, argv  # noqa: E402

KEYS = ("step", "loss", "lr", "grad_norm", "train_accuracy", "skipped_steps", "eval_loss", "eval_accuracy")


def test_an_old_checkpoint_resumes_to_the_recorded_curve(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", documents=DOCUMENTS)
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", out / "checkpoints")
    shutil.copytree(FIXTURE / "cache", tmp_path / "cache")  # the old run's tokenizer and token ids
    shutil.copy(FIXTURE / "metrics.jsonl", out / "metrics.jsonl")  # the resumed run keeps steps <= 4
    assert cli(argv(corpus, tmp_path / "cache", out, "--resume")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps_completed"] == 8
    got = [{k: r.get(k) for k in KEYS} for r in read_metrics(out / "metrics.jsonl")]
    expected = [{k: r.get(k) for k in KEYS} for r in read_metrics(FIXTURE / "metrics.jsonl")]
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 2, 4, 6, 8]
    for g, e in zip(got, expected):
        for key in KEYS:
            assert (g[key] is None and e[key] is None) or g[key] == pytest.approx(e[key], rel=1e-6, abs=1e-9), (key, g, e)
