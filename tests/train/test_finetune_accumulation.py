"""Fine-tuning with gradient accumulation: with dropout off, K=4 micro-batches in one process and
K=2 in each of two processes (gloo) give the curve of one batch per step (K=1)."""

from __future__ import annotations

import pytest

from _torchrun import torchrun
from bertopt.cli import main as cli
from bertopt.train.report import read_metrics
from test_finetune import finetune_argv, write_sentiment_csv, write_tiny_model

pytestmark = pytest.mark.slow

# Summation order differs (micro-batches, processes): values agree to float32 rounding.
# Measured: at most 1.9e-7 relative (loss, grad norm, accuracies); the bound is 1e-5.
REL_TOL = 1e-5
KEYS = ("loss", "grad_norm", "lr", "train_accuracy", "dev_loss", "dev_accuracy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune-accumulation")
    model_dir = write_tiny_model(base / "tiny-bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args = finetune_argv(model_dir, write_sentiment_csv(base / "reviews.csv"), "OUT", "--steps", "6",
                         "--eval-every", "3")
    del args[args.index("--out"):args.index("--out") + 2]
    assert cli([*args, "--out", str(base / "k1")]) == 0
    return {"args": args, "base": base, "reference": read_metrics(base / "k1" / "metrics.jsonl")}


def _assert_same_curve(records, reference):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        for key in KEYS:
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=REL_TOL, abs=1e-9), (key, got, want)


def test_four_micro_batches_match_one_batch(setup):
    out = setup["base"] / "k4"
    assert cli([*setup["args"], "--grad-accum-steps", "4", "--out", str(out)]) == 0
    _assert_same_curve(read_metrics(out / "metrics.jsonl"), setup["reference"])


@pytest.mark.multiprocess
def test_two_processes_of_two_micro_batches_match_one_batch(setup):
    records, _ = torchrun([*setup["args"], "--grad-accum-steps", "2"], setup["base"] / "p2k2")
    _assert_same_curve(records, setup["reference"])
