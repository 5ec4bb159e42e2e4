"""Bad input to `bertopt pretrain`: each is one paragraph on stderr (what went wrong, what to do),
a non-zero exit code, no traceback unless --debug, and nothing already saved is lost.

All runs are in-process (``bertopt.cli.main``) on a nano BERT and a tiny corpus, one thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from _faults import (assert_same_curve, assert_verified_checkpoint, curve, pretrain_argv, summary,
                     write_corpus)
from bertopt.cli import main as cli
from bertopt.train import checkpoint as ckpt
from bertopt.train import data as data_mod
from bertopt.train import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-faults")
    return {"corpus": write_corpus(base / "corpus"), "cache": base / "cache", "base": base}


@pytest.fixture(scope="module")
def finished(data):
    """A finished 6-step run with checkpoints at steps 3 and 6 (copied by each test that damages it)."""
    out = data["base"] / "finished"
    assert cli(pretrain_argv(data["corpus"], data["cache"], out, steps=6)) == 0
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [3, 6]
    return out


def _run(capsys, argv) -> tuple[int, str, str]:
    code = cli(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_paragraph_error(err: str, *phrases: str) -> None:
    """A single ``bertopt pretrain: error:`` paragraph containing ``phrases``, no traceback."""
    assert "Traceback" not in err, err
    assert err.startswith("bertopt pretrain: error: "), err
    assert "\n\n" not in err.strip(), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


# --- the corpus -----------------------------------------------------------------------------


def test_missing_corpus_file(data, tmp_path, capsys):
    code, _, err = _run(capsys, pretrain_argv(tmp_path / "nope.txt", data["cache"], tmp_path / "out"))
    assert code == 2
    _one_paragraph_error(err, "--corpus", "nope.txt", "no such file or folder")


def test_corpus_folder_without_text_files(data, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("not a .txt file")
    code, _, err = _run(capsys, pretrain_argv(tmp_path / "folder", data["cache"], tmp_path / "out"))
    assert code == 2
    _one_paragraph_error(err, "contains no .txt files")


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"], ids=["empty", "whitespace"])
def test_empty_corpus_file(data, tmp_path, capsys, content):
    (tmp_path / "empty.txt").write_bytes(content)
    code, _, err = _run(capsys, pretrain_argv(tmp_path / "empty.txt", tmp_path / "cache", tmp_path / "out"))
    assert code == 2
    _one_paragraph_error(err, "empty.txt", "empty")


def test_binary_corpus_file(data, tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 40)
    code, _, err = _run(capsys, pretrain_argv(tmp_path / "model.bin", data["cache"], tmp_path / "out"))
    assert code == 2
    _one_paragraph_error(err, "model.bin", "binary", "UTF-8 text")


def test_non_utf8_corpus_file(data, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("Un café crème, s'il vous plaît.\n".encode("latin-1"))
    code, _, err = _run(capsys, pretrain_argv(tmp_path / "latin1.txt", tmp_path / "cache", tmp_path / "out"))
    assert code == 2
    _one_paragraph_error(err, "latin1.txt", "not valid UTF-8", "iconv")


def test_corpus_smaller_than_one_batch(data, tmp_path, capsys):
    (tmp_path / "small.txt").write_text("Only one short sentence here, far too little to train on.\n")
    code, _, err = _run(capsys, pretrain_argv(tmp_path / "small.txt", tmp_path / "cache", tmp_path / "out"))
    assert code == 2
    _one_paragraph_error(err, "fewer than one batch", "--batch-size 8", "bigger corpus")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_damaged_data_cache_is_rebuilt(data, tmp_path, capsys):
    """A cache file damaged outside bertopt (bertopt itself writes them atomically) is rebuilt."""
    cache = tmp_path / "cache"
    assert cli(pretrain_argv(data["corpus"], cache, tmp_path / "first", steps=2)) == 0
    (packed,) = cache.glob("*/train-L32.npy")
    packed.write_bytes(packed.read_bytes()[:1000])  # truncated
    capsys.readouterr()
    code, out, err = _run(capsys, pretrain_argv(data["corpus"], cache, tmp_path / "second", steps=2))
    assert code == 0, err
    assert "cannot be read" in out and "building them again" in out
    assert curve(tmp_path / "second") == curve(tmp_path / "first")


# --- the model ----------------------------------------------------------------------------


def test_unknown_preset_is_refused_before_any_work(data, tmp_path, capsys):
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], tmp_path / "cache", tmp_path / "out", "--preset", "huge"))
    assert code == 2
    _one_paragraph_error(err, "--preset must be one of nano, tiny")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()  # checked before anything


@pytest.mark.parametrize("text, message", [
    ("{oops", "not a readable JSON file"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"hidden_size": 30, "num_hidden_layers": 1, "num_attention_heads": 4}), "not divisible"),
    (json.dumps({"hidden_size": 32, "num_hidden_layers": 0, "num_attention_heads": 2}), "num_hidden_layers must be"),
    (json.dumps({"model_type": "gpt2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}),
     "only 'bert'"),
], ids=["bad-json", "not-an-object", "heads", "layers", "model-type"])
def test_malformed_config_file(data, tmp_path, capsys, text, message):
    config = tmp_path / "config.json"
    config.write_text(text)
    argv = pretrain_argv(data["corpus"], tmp_path / "cache", tmp_path / "out")
    argv[argv.index("--preset"):argv.index("--preset") + 2] = ["--config", str(config)]
    code, _, err = _run(capsys, argv)
    assert code == 2
    _one_paragraph_error(err, "--config", message)
    assert not (tmp_path / "cache").exists()


# --- where the output goes ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_output_directory_cannot_be_created(data, tmp_path, capsys, where):
    """A real kernel refusal (ENOTDIR / EEXIST), also for root: --out lies under, or is, a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    out = blocker / "run" if where == "under-a-file" else blocker
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out))
    assert code == 2
    _one_paragraph_error(err, f"--out {out}: cannot write there", "choose a directory you can write to")
    assert blocker.read_text() == "a regular file"


@contextlib.contextmanager
def _read_only(directory: Path):
    """Make ``directory`` unwritable for real: chmod for a normal user; for root (which chmod does
    not stop) the immutable attribute (chattr +i), which the kernel enforces for root too."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o555)
        undo = lambda: directory.chmod(0o755)  # noqa: E731
    else:
        try:
            done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
        except FileNotFoundError:
            done = False
        if not done:
            pytest.skip("running as root without chattr +i: cannot make a directory read-only here")
        undo = lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)  # noqa: E731
    try:
        with pytest.raises(OSError):
            (directory / "probe").write_text("x")  # the simulation holds: writing fails
        yield directory
    finally:
        undo()


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_read_only_directory(data, tmp_path, capsys, flag):
    with _read_only(tmp_path / "locked") as locked:
        argv = pretrain_argv(data["corpus"], data["cache"], tmp_path / "out")
        argv[argv.index(flag) + 1] = str(locked)
        code, _, err = _run(capsys, argv)
        assert list(locked.iterdir()) == []
    assert code == 2
    _one_paragraph_error(err, f"{flag} {locked}: cannot write there", "choose a directory you can write to")


def test_unfinished_run_is_not_replaced_without_resume(data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "summary.json").unlink()  # as if it had been killed
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, steps=6))
    assert code == 2
    _one_paragraph_error(err, "holds an unfinished run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


# --- --resume -------------------------------------------------------------------------------


def _damage(payload: Path, how: str) -> None:
    data = payload.read_bytes()
    if how == "flip":
        payload.write_bytes(data[:1000] + bytes([data[1000] ^ 0x10]) + data[1001:])
    else:
        payload.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("how, message", [("flip", "checksum mismatch"), ("truncate", "truncated or altered")],
                         ids=["corrupt", "truncated"])
def test_resume_when_every_checkpoint_is_damaged(data, finished, tmp_path, capsys, how, message):
    out = _copy(finished, tmp_path)
    for info in ckpt.list_checkpoints(out / "checkpoints"):
        _damage(info.payload_path, how)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, "--resume", steps=6))
    assert code == 1
    assert "Traceback" not in err and "every checkpoint failed verification" in err and message in err
    assert "--resume takes a checkpoints directory" in err
    # bertopt neither deletes nor rewrites what it could not read
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_resume_falls_back_when_the_newest_checkpoint_is_damaged(data, finished, tmp_path, capsys, how):
    out = _copy(finished, tmp_path)
    _damage(ckpt.list_checkpoints(out / "checkpoints")[-1].payload_path, how)
    code, stdout, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, "--resume", steps=6))
    assert code == 0, err
    assert "skipped a checkpoint that failed verification" in stdout and "step-00000006" in stdout
    assert summary(out)["resumed_from"] == 3
    assert_same_curve(curve(out), curve(finished))  # steps 4..6 trained again, identically
    assert assert_verified_checkpoint(out).info.step == 6  # the damaged one was replaced


def test_resume_with_a_different_model(data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, "--resume", "--preset", "tiny", steps=6))
    assert code == 1
    _one_paragraph_error(err, "different model_config", "hidden_size: 64 in the checkpoint, 128 in this run",
                         "resume with the same settings")


def test_resume_with_a_different_optimizer(data, finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, "--resume", "--optimizer", "lamb",
                                              steps=6))
    assert code == 1
    _one_paragraph_error(err, "optimizer='adam' but this run has optimizer='lamb'")


def test_resume_a_checkpoint_of_another_program(data, tmp_path, capsys):
    """A verified checkpoint written by some other use of the training loop: refused by its run info."""
    from bertopt.train.config import RunConfig
    from bertopt.train.job import Job, StepOutput
    from bertopt.train.loop import run_training

    class Task:
        def batch(self, step):
            return torch.ones(2, 3)

        def forward(self, model, batch):
            return StepOutput((model(batch) ** 2).sum(), count=2)

    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    run_training(Job(model, Task(), 2, run_info={"task": "other"}, plots=False),
                 RunConfig(out=tmp_path / "other", progress=False), optimizer, scheduler)
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], tmp_path / "out", "--resume",
                                              str(tmp_path / "other" / "checkpoints")))
    assert code == 1
    _one_paragraph_error(err, "does not record command", "another command or program")


def test_resume_a_checkpoint_whose_weights_do_not_fit(data, finished, tmp_path, capsys):
    """A checkpoint that verifies and claims this run's settings, but holds other tensors."""
    out = _copy(finished, tmp_path)
    loaded = ckpt.load_checkpoint(out / "checkpoints")
    loaded.state["model"]["bert.embeddings.word_embeddings.weight"] = torch.zeros(7, 5)
    ckpt.save_checkpoint(out / "checkpoints", 9, loaded.state, meta=loaded.info.meta)
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, "--resume", steps=6))
    assert code == 1
    _one_paragraph_error(err, "step-00000009.json", "does not fit this model", "different model")


def test_resume_path_that_does_not_exist(data, tmp_path, capsys):
    code, _, err = _run(capsys, pretrain_argv(data["corpus"], tmp_path / "cache", tmp_path / "out", "--resume",
                                              str(tmp_path / "step-00000042.json")))
    assert code == 2
    _one_paragraph_error(err, "--resume", "no such checkpoint", "--resume alone")
    assert not (tmp_path / "cache").exists()  # found before any work


# --- how errors are shown -------------------------------------------------------------------


def test_unexpected_error_is_one_paragraph_and_debug_shows_the_traceback(data, tmp_path, capsys, monkeypatch):
    def broken(self, model, batch):
        raise RuntimeError("simulated bug in a forward pass")

    monkeypatch.setattr(pretrain.MaskedLMTask, "forward", broken)
    argv = pretrain_argv(data["corpus"], data["cache"], tmp_path / "out")
    code, _, err = _run(capsys, argv)
    assert code == 1
    _one_paragraph_error(err, "unexpected RuntimeError: simulated bug in a forward pass", "--debug")
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):  # before or after the command name
        with pytest.raises(RuntimeError, match="simulated bug"):
            cli(debug_argv + ["--overwrite"])


def test_debug_shows_the_traceback_of_bad_input_too(data, tmp_path):
    with pytest.raises(ValueError, match="--preset must be one of"):
        cli(pretrain_argv(data["corpus"], data["cache"], tmp_path / "out", "--preset", "huge", "--debug"))


def test_unknown_flag_or_bad_number_is_a_usage_message(data, tmp_path, capsys):
    for extra, message in ((["--stepz", "3"], "unrecognized arguments: --stepz"),
                           (["--steps", "three"], "argument --steps: invalid int value: 'three'")):
        with pytest.raises(SystemExit) as stop:  # argparse's exit, as the console script sees it
            cli(pretrain_argv(data["corpus"], data["cache"], tmp_path / "out", *extra))
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: bertopt") and message in err and "Traceback" not in err


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_data_preparation(data, tmp_path, capsys, monkeypatch, signum, code):
    """Ctrl-C / SIGTERM while the corpus is being tokenized (a real signal to this process): a
    short message and 130 / 143, no traceback, no half-written cache file; the next run works."""
    real_pack = data_mod._pack

    def pack_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)  # delivered while preparing the data
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(data_mod, "_pack", pack_then_signal)
    # A shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
    # handler; give this process the interactive default, as a terminal would.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    handler_before = signal.getsignal(signal.SIGTERM)
    cache = tmp_path / "cache"
    argv = pretrain_argv(data["corpus"], cache, tmp_path / "out", steps=2)
    got, _, err = _run(capsys, argv)
    assert got == code
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert err.startswith(f"bertopt pretrain: stopped by {name}") and "Traceback" not in err
    assert [p.name for p in cache.rglob(".*")] == []  # no temporary files left behind
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the CLI put the handler back
    monkeypatch.undo()
    signal.signal(signal.SIGINT, previous_sigint)
    assert cli(argv) == 0


def test_resume_before_any_checkpoint_starts_from_step_0(data, tmp_path, capsys):
    """--resume on a run that was killed before its first checkpoint: a note, then a fresh start."""
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, pretrain_argv(data["corpus"], data["cache"], out, "--resume", steps=3))
    assert code == 0, err
    assert "no checkpoint in" in stdout and "starting from step 0" in stdout
    assert summary(out)["resumed_from"] is None and summary(out)["steps_completed"] == 3


@pytest.mark.parametrize("argv, message", [
    (["study", "--seeds", "0"], "bertopt study: error: --seeds must be >= 1, got 0"),
    (["schedule", "--steps", "0"], "bertopt schedule: error: num_train_steps must be a positive integer"),
    (["bench", "--quick", "--sizes", "nope", "--no-plot"], "bertopt bench: error: size must be one of"),
    (["finetune", "--data", "/nonexistent/reviews.csv"], "bertopt finetune: error: --data /nonexistent/reviews.csv"),
], ids=["study", "schedule", "bench", "finetune"])
def test_every_command_reports_bad_input_as_one_paragraph(tmp_path, capsys, monkeypatch, argv, message):
    """Not only pretrain: every command's bad input is one paragraph and exit 2, and --debug
    (before or after the command name) shows the traceback instead."""
    monkeypatch.chdir(tmp_path)  # whatever a command might create goes here
    code, _, err = _run(capsys, argv)
    assert code == 2
    assert err.startswith(message) and "Traceback" not in err and err.count("\n") == 1, err
    for debug_argv in (["--debug", *argv], [argv[0], "--debug", *argv[1:]]):
        with pytest.raises((ValueError, FileNotFoundError)):
            cli(debug_argv)
