"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 give the losses of 1 process on the same
global batch, and an FSDP2 checkpoint resumes in a single process. Gradient accumulation: K
micro-batches per step (K=4 in one process, K=2 in each of two) give the same curve too, and a run
resumed with another K continues it."""

from __future__ import annotations

import json
import shutil

import pytest

from _corpus import write_corpus
from _torchrun import torchrun
from bertopt.cli import main as cli
from bertopt.train.report import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# Reduction order differs between 1 and 2 processes (float32 sums of halves vs of the whole), so
# values agree to rounding, not bit for bit: measured differences were <= 5e-7 over 10 steps (and
# <= 1.1e-7 relative for the gradient-accumulation runs).
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    config = base / "no-dropout.json"  # dropout draws differ per process; switch it off to compare
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    args = ["pretrain", "--config", str(config), "--corpus", str(write_corpus(base / "text", documents=200)),
            "--cache-dir", str(base / "cache"), "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8",
            "--steps", "10", "--lr", "3e-3", "--log-every", "1", "--eval-every", "5", "--save-every", "5",
            "--keep-checkpoints", "0", "--threads", "1", "--no-progress"]
    assert cli([*args, "--out", str(base / "one")]) == 0
    return {"args": args, "base": base, "reference": read_metrics(base / "one" / "metrics.jsonl")}


def _assert_close(records, reference):
    assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(0, 11))
    for got, want in zip(records, reference):
        for key in ("loss", "grad_norm", "lr", "eval_loss", "eval_accuracy"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=REL_TOL, abs=1e-9), (key, got, want)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, mode):
    out = setup["base"] / mode
    extra = ["--fsdp"] if mode == "fsdp" else []
    records, stdout = torchrun([*setup["args"], *extra], out)
    assert f"2 processes ({'FSDP2' if mode == 'fsdp' else 'DDP'}, gloo)" in stdout
    _assert_close(records, setup["reference"])
    if mode == "fsdp":
        # a checkpoint written by 2 sharded processes resumes in 1 process and continues the curve
        assert cli([*setup["args"], "--out", str(out), "--resume", str(out / "checkpoints" / "step-00000005.json")]) == 0
        _assert_close(read_metrics(out / "metrics.jsonl"), setup["reference"])


def test_four_micro_batches_match_one_batch(setup):
    out = setup["base"] / "k4"
    assert cli([*setup["args"], "--grad-accum-steps", "4", "--out", str(out)]) == 0
    _assert_close(read_metrics(out / "metrics.jsonl"), setup["reference"])
    assert json.loads((out / "summary.json").read_text())["run"]["grad_accum_steps"] == 4


def test_two_processes_of_two_micro_batches_match_one_batch(setup):
    records, _ = torchrun([*setup["args"], "--grad-accum-steps", "2"], setup["base"] / "p2k2")
    _assert_close(records, setup["reference"])


def test_resumed_with_another_k_continues_the_run(setup):
    """A checkpoint made with K=1 (the reference run's) continues with K=4: the same curve."""
    out = setup["base"] / "k1-then-k4"
    shutil.copytree(setup["base"] / "one", out)
    assert cli([*setup["args"], "--grad-accum-steps", "4", "--out", str(out), "--resume",
                str(out / "checkpoints" / "step-00000005.json")]) == 0
    _assert_close(read_metrics(out / "metrics.jsonl"), setup["reference"])


def test_grad_accum_steps_that_do_not_divide_the_batch_are_refused(setup, capsys):
    out = setup["base"] / "bad"
    assert cli([*setup["args"], "--grad-accum-steps", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--grad-accum-steps 3 must divide the per-process batch (8" in err and "Traceback" not in err
    assert cli([*setup["args"], "--grad-accum-steps", "0", "--out", str(out)]) == 2
    assert "--grad-accum-steps must be >= 1; got 0" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
