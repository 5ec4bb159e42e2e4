"""`bertopt pretrain` options beyond the defaults: --precision, --compile, and the errors each gives
for input it cannot honour (--from and its old name --init-from: test_pretrain_from.py)."""

from __future__ import annotations

import json
import sys

import pytest

from _corpus import write_corpus
from bertopt.cli import main as cli
from bertopt.train.report import read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("options")
    return {"text": write_corpus(base / "text", documents=200), "cache": base / "cache"}


def _argv(corpus, out, *extra, steps=6, preset="nano"):
    return ["pretrain", *(["--preset", preset] if preset else []), "--corpus", str(corpus["text"]), "--cache-dir", str(corpus["cache"]),
            "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8", "--steps", str(steps), "--lr", "3e-3",
            "--log-every", "1", "--eval-every", "0", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def _error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_bf16_trains_and_records_its_precision(corpus, tmp_path):
    out = tmp_path / "bf16"
    assert cli(_argv(corpus, out, "--precision", "bf16", "--dropout", "0", steps=12)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["precision"] == "bf16"
    assert summary["eval_loss"] < summary["eval_loss_at_start"]
    # the same run in fp32 starts from the same loss to bf16 rounding, then both learn
    fp32 = tmp_path / "fp32"
    assert cli(_argv(corpus, fp32, "--dropout", "0", steps=12)) == 0
    first_bf16, first_fp32 = (read_metrics(d / "metrics.jsonl")[1]["loss"] for d in (out, fp32))
    assert first_bf16 == pytest.approx(first_fp32, rel=2e-2)


def test_fp16_on_a_cpu_is_refused_before_any_work(corpus, tmp_path, capsys):
    assert cli(_argv(corpus, tmp_path / "out", "--precision", "fp16")) == 2
    _error(capsys, "--precision fp16 needs a CUDA GPU", "--precision bf16")
    assert not (tmp_path / "out").exists()


def test_compile_matches_eager_and_reports_the_first_step(corpus, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli(_argv(corpus, eager, "--dropout", "0", steps=4)) == 0
    assert cli(_argv(corpus, compiled, "--dropout", "0", "--compile", steps=4)) == 0
    for a, b in zip(read_metrics(eager / "metrics.jsonl"), read_metrics(compiled / "metrics.jsonl")):
        if "loss" in a:  # inductor fuses differently: equal to float32 rounding, not bit for bit
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    summary = json.loads((compiled / "summary.json").read_text())
    assert summary["first_step_s"] > 0 and summary["run"]["command"] == "pretrain"


def test_compile_without_a_working_compiler_says_how_to_run_without_it(corpus, tmp_path, capsys, monkeypatch):
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))  # what $CXX would set
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))  # no cached kernels to reuse
    out = tmp_path / "out"
    assert cli(_argv(corpus, out, "--compile", steps=2)) == 2
    _error(capsys, "--compile: torch.compile failed", "run without --compile")
    assert not (out / "checkpoints").exists()  # nothing was trained, nothing to lose


def test_resume_with_a_different_global_batch_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(_argv(corpus, out, "--save-every", "2", steps=4)) == 0
    argv = _argv(corpus, out, "--resume", steps=4)
    argv[argv.index("--batch-size") + 1] = "16"
    assert cli(argv) == 1
    _error(capsys, "batch_size=8 but this run has batch_size=16", "resume with the same settings")


def test_a_missing_train_extra_names_the_pip_line(corpus, tmp_path, capsys, monkeypatch):
    """`pip install bertopt` without the `train` extra: the training commands say what to install."""
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now fails, as when it is absent
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numpy" else real_find_spec(name, *a))
    assert cli(_argv(corpus, tmp_path / "out")) == 1
    _error(capsys, "bertopt pretrain needs the packages of bertopt's `train` extra", "numpy is not installed",
           "pip install 'bertopt[train]'")


def test_whole_word_masking_reaches_the_masking(corpus, tmp_path, monkeypatch):
    from bertopt.train import data

    real_mask = data.mask_tokens
    seen = []

    def spy(ids, rng, **kwargs):
        seen.append(kwargs.get("word_start"))
        return real_mask(ids, rng, **kwargs)

    monkeypatch.setattr(data, "mask_tokens", spy)
    out = tmp_path / "wwm"
    assert cli(_argv(corpus, out, "--whole-word-masking", steps=3)) == 0
    assert seen and all(w is not None and w.dtype == bool for w in seen)
    assert json.loads((out / "summary.json").read_text())["run"]["whole_word_masking"] is True
    seen.clear()
    assert cli(_argv(corpus, tmp_path / "plain", steps=3)) == 0
    assert seen and all(w is None for w in seen)  # off by default, as in the original BERT
