"""`bertopt pretrain` end to end on a tiny corpus: learning, reports, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from _corpus import write_corpus
from bertopt.cli import main as cli
from bertopt.train import checkpoint as ckpt
from bertopt.train import pretrain
from bertopt.train.report import read_metrics

STEPS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain-corpus")
    return {"corpus": write_corpus(base / "text", documents=200), "cache": base / "cache"}


def _argv(corpus, out, *extra, steps=STEPS):
    return ["pretrain", "--preset", "nano", "--corpus", str(corpus["corpus"]), "--cache-dir", str(corpus["cache"]),
            "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8", "--steps", str(steps), "--lr", "3e-3",
            "--log-every", "2", "--eval-every", "8", "--save-every", "6", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


def _curve(out):
    return [(r["step"], r.get("loss"), r["lr"], r.get("grad_norm"), r.get("eval_loss"))
            for r in read_metrics(out / "metrics.jsonl")]


def _assert_same_curve(a, b):
    """Same steps; losses, LRs and grad norms equal to 1e-6 (relative) - in practice bit-identical."""
    assert [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a, b):
        for x, y in zip(ra[1:], rb[1:]):
            assert (x is None and y is None) or x == pytest.approx(y, rel=1e-6, abs=1e-9), (ra, rb)


@pytest.mark.slow
def test_default_flags_train_report_and_hand_off_a_model(corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(_argv(corpus, out)) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, *range(2, STEPS + 1, 2)]
    assert set(records[0]) == {"step", "lr", "eval_loss", "eval_accuracy"}  # evaluation before training
    records = records[1:]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "train_accuracy"} <= set(r)
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 16, 24]
    summary = json.loads((out / "summary.json").read_text())
    # the synthetic language is easy: the held-out loss falls well below its start (ln 300 = 5.7)
    assert summary["eval_loss_at_start"] > 5.0
    assert summary["eval_loss"] < summary["eval_loss_at_start"] - 1.0
    assert summary["eval_accuracy"] > summary["eval_accuracy_at_start"]
    assert summary["run"]["optimizer"] == "adam" and summary["data"]["documents"] == 200
    for name in ("loss.png", "lr.png"):
        assert (out / name).stat().st_size > 5000
    # Google's schedule: LR 0 at step 0, peak at the end of warmup (2 steps), linear to 0 at the end
    lrs = {r["step"]: r["lr"] for r in records}
    assert lrs[2] == pytest.approx(3e-3 * 1 / 2)  # step 2 ran at index 1: warmup (W = int(0.1 * 24) = 2)
    assert lrs[4] == pytest.approx(3e-3 * (1 - 3 / STEPS))  # index 3: decay counted from step 0
    assert lrs[STEPS] == pytest.approx(3e-3 * (1 - (STEPS - 1) / STEPS))
    # the model directory loads with plain transformers
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = BertForMaskedLM.from_pretrained(out / "model")
    assert tokenizer.mask_token_id == 4 and model.config.vocab_size == summary["data"]["vocab_size"]
    state, run_info = ckpt.load_model_state(out / "checkpoints")
    assert run_info["model_config"]["hidden_size"] == 64
    import torch

    assert torch.equal(state["bert.embeddings.word_embeddings.weight"], model.bert.embeddings.word_embeddings.weight)


@pytest.mark.slow
def test_sigint_then_resume_reproduces_the_uninterrupted_curve(corpus, tmp_path, monkeypatch):
    assert cli(_argv(corpus, tmp_path / "straight")) == 0
    real_batch = pretrain.MaskedLMTask.batch

    def interrupt_at_11(self, step):
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, step)

    monkeypatch.setattr(pretrain.MaskedLMTask, "batch", interrupt_at_11)
    assert cli(_argv(corpus, tmp_path / "resumed")) == 130
    assert ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoints").info.step == 11
    monkeypatch.undo()
    # an unfinished run is not silently replaced
    assert cli(_argv(corpus, tmp_path / "resumed")) == 2
    assert cli(_argv(corpus, tmp_path / "resumed", "--resume")) == 0
    _assert_same_curve(_curve(tmp_path / "resumed"), _curve(tmp_path / "straight"))
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["resumed_from"] == 11 and summary["steps_completed"] == STEPS


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_curve(corpus, tmp_path):
    """A real crash: kill -9 the training process after its checkpoint at step 12, resume."""
    assert cli(_argv(corpus, tmp_path / "straight", steps=36)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bertopt", *_argv(corpus, out, steps=36)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt.latest_checkpoint(out / "checkpoints")
        if latest is not None and latest.step >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.load_checkpoint(out / "checkpoints").info.step
    assert 12 <= killed_at < 36
    assert cli(_argv(corpus, out, "--resume", steps=36)) == 0
    _assert_same_curve(_curve(out), _curve(tmp_path / "straight"))


def test_resume_refuses_other_settings(corpus, tmp_path):
    out = tmp_path / "run"
    assert cli(_argv(corpus, out, steps=4)) == 0
    assert cli(_argv(corpus, out, "--resume", "--lr", "1e-3", steps=4)) == 1  # lr differs: CheckpointError
    assert cli(_argv(corpus, out, steps=4)) == 0  # a finished run may be replaced by a new one


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "--preset must be one of"),
    (["--seq-len", "4"], "--seq-len must be between 8 and 512"),
    (["--lr", "0"], "--lr must be in"),
    (["--batch-size", "5000"], "fewer than one batch"),
    (["--warmup-steps", "100"], "longer than training"),
])
def test_bad_input_is_one_clear_line(corpus, tmp_path, capsys, extra, message):
    assert cli(_argv(corpus, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lamb_trains(corpus, tmp_path):
    import bertopt

    assert isinstance(bertopt.Lamb, type)  # a lost export fails here, not as a skip
    out = tmp_path / "lamb"
    assert cli(_argv(corpus, out, "--optimizer", "lamb", "--lr", "1e-2", steps=8)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["optimizer"] == "lamb" and summary["eval_loss"] < summary["eval_loss_at_start"]


def test_config_file_errors(tmp_path):
    from bertopt.train.presets import build_config, config_from_file

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "hidden_dropout_prob": 0.0, "vocab_size": 5}))
    config = build_config(preset=None, config_file=good, vocab_size=300)
    assert (config.vocab_size, config.intermediate_size, config.hidden_dropout_prob) == (300, 128, 0.0)
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="not a readable JSON"):
        config_from_file(bad, 300)
    bad.write_text(json.dumps({"hidden_size": 30, "num_hidden_layers": 1, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="not divisible"):
        config_from_file(bad, 300)
    with pytest.raises(ValueError, match="no such file"):
        config_from_file(tmp_path / "missing.json", 300)


def test_config_for_in_process_use():
    from bertopt.train.config import OptimConfig, PretrainConfig

    config = PretrainConfig(steps=7, optim=OptimConfig(lr=1e-3))
    assert (config.steps, config.optim.lr, config.preset, config.optim.optimizer) == (7, 1e-3, None, "adam")
    with pytest.raises(TypeError, match="stepz"):
        PretrainConfig(stepz=7)
