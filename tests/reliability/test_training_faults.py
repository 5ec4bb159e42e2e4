"""Faults in the middle of `bertopt pretrain`: non-finite losses and gradients, a full disk, an
impatient second Ctrl-C. Each ends with a clear message and exit code, the last good checkpoint
verifies, and ``--resume`` then logs exactly what an uninterrupted run logs.

In-process runs (``bertopt.cli.main``) of a nano BERT for 12 steps, checkpoints every 3 steps.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from _faults import (assert_prefix_of, assert_same_curve, assert_verified_checkpoint, curve, pretrain_argv, summary,
                     write_corpus)
from bertopt.cli import main as cli
from bertopt.train import checkpoint as ckpt
from bertopt.train import pretrain
from bertopt.train.report import MetricsLog, read_metrics

STEPS = 12

# the disk tests count checkpoints: without the one --on-spike rewind saves before the first step
NO_GUARD = ("--on-spike", "off")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("training-faults")
    corpus, cache = write_corpus(base / "corpus"), base / "cache"

    def argv(out, *extra, steps=STEPS, save_every=3):
        return pretrain_argv(corpus, cache, out, *extra, steps=steps, save_every=save_every)

    reference = base / "reference"
    assert cli(argv(reference)) == 0
    return {"argv": argv, "reference": curve(reference), "base": base}


def _run(capsys, argv) -> tuple[int, str, str]:
    code = cli(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_paragraph(err: str, *phrases: str) -> None:
    assert "Traceback" not in err and err.startswith("bertopt pretrain: error: "), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t) and t.is_floating_point())


# --- non-finite loss and gradients --------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_loss_stops_naming_the_step(data, tmp_path, capsys, monkeypatch, value, fault_at_steps):
    out = tmp_path / "run"

    def poison(step_output):
        step_output.loss_sum = step_output.loss_sum * value

    fault_at_steps(pretrain.MaskedLMTask, {5}, poison)
    code, _, err = _run(capsys, data["argv"](out))
    assert code == 1
    _error_paragraph(err, f"the training loss is {value} at step 5", "this update was not applied",
                     "step-00000003.json) is intact", "--resume", "--on-nonfinite skip")
    saved = assert_verified_checkpoint(out)
    assert saved.info.step == 3 and _all_finite(saved.state["model"])
    monkeypatch.undo()
    assert cli(data["argv"](out, "--resume")) == 0
    assert_same_curve(curve(out), data["reference"])


def test_nonfinite_loss_skip_mode_skips_the_update(data, tmp_path, capsys, monkeypatch, fault_at_steps):
    """--on-nonfinite skip: steps 5 and 6 have a nan loss; their updates are not applied (the
    weights and Adam moments after step 6 equal those after step 4), the run goes on and logs
    how many steps it skipped."""
    out = tmp_path / "run"
    fault_at_steps(pretrain.MaskedLMTask, {5, 6}, lambda o: setattr(o, "loss_sum", o.loss_sum * math.nan))
    code, stdout, err = _run(capsys, data["argv"](out, "--on-nonfinite", "skip", "--keep-checkpoints", "0",
                                                  save_every=1))
    assert code == 0, err
    assert "loss is nan at step 5; skipped this update" in stdout and "at step 6; skipped" in stdout
    records = read_metrics(out / "metrics.jsonl")
    by_step = {r["step"]: r for r in records}
    assert by_step[4]["nonfinite_loss_steps"] == 0 and by_step[6]["nonfinite_loss_steps"] == 2
    assert by_step[6]["loss"] == "nan" and by_step[8]["loss"] < by_step[4]["loss"]  # window 5-6: all skipped
    assert_prefix_of([r for r in curve(out) if r["step"] <= 4], data["reference"])
    after = {c.step: c for c in ckpt.list_checkpoints(out / "checkpoints")}
    four, six = (ckpt.load_checkpoint(after[s].manifest_path).state for s in (4, 6))
    for name, tensor in four["model"].items():
        assert torch.equal(tensor, six["model"][name]), name
    for key, state in four["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], six["optimizer"]["state"][key]["exp_avg"])
    assert four["scheduler"]["last_epoch"] + 2 == six["scheduler"]["last_epoch"]  # the schedule moved on
    assert summary(out)["steps_completed"] == STEPS and _all_finite(six["model"])


def test_nonfinite_loss_skip_mode_stops_after_ten_in_a_row(data, tmp_path, capsys, monkeypatch, fault_at_steps):
    out = tmp_path / "run"
    fault_at_steps(pretrain.MaskedLMTask, set(range(3, 20)), lambda o: setattr(o, "loss_sum", o.loss_sum * math.inf))
    code, _, err = _run(capsys, data["argv"](out, "--on-nonfinite", "skip", steps=14))
    assert code == 1
    _error_paragraph(err, "non-finite at 10 steps in a row (steps 3 to 12", "none of them was applied",
                     "step-00000009.json) is intact", "Lower --lr")
    assert _all_finite(assert_verified_checkpoint(out).state["model"])


def test_nonfinite_gradient_is_skipped_by_the_optimizer_and_counted_across_resume(data, tmp_path, capsys,
                                                                                 monkeypatch, fault_at_steps):
    """A finite loss whose gradient is inf (step 5): BertAdam skips the step itself; metrics.jsonl
    logs skipped_steps, and the count survives a crash at step 8 and --resume from step 6."""
    def inf_gradient(step_output):
        step_output.loss_sum.register_hook(lambda g: g * math.inf)

    fault_at_steps(pretrain.MaskedLMTask, {5}, inf_gradient)
    straight = tmp_path / "straight"
    assert cli(data["argv"](straight)) == 0
    expected = curve(straight)
    assert [r["skipped_steps"] for r in expected if r["step"] >= 2] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in expected if "loss" in r)

    real_batch = pretrain.MaskedLMTask.batch

    def crash_at_8(self, step):
        if step + 1 == 8:
            raise RuntimeError("simulated crash")
        return real_batch(self, step)

    monkeypatch.setattr(pretrain.MaskedLMTask, "batch", crash_at_8)
    crashed = tmp_path / "crashed"
    assert cli(data["argv"](crashed)) == 1
    capsys.readouterr()
    monkeypatch.setattr(pretrain.MaskedLMTask, "batch", real_batch)
    assert cli(data["argv"](crashed, "--resume")) == 0
    assert summary(crashed)["resumed_from"] == 6
    assert_same_curve(curve(crashed), expected)


# --- a full disk ----------------------------------------------------------------------------


class _DiskFillsUp:
    """A file whose write() stores what fits in ``room`` bytes and then fails with ENOSPC, as
    write(2) does on a full disk."""

    def __init__(self, raw, room: int):
        self.raw, self.room = raw, room

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) > self.room:
            self.raw.write(view[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(view)
        return self.raw.write(view)


def test_full_disk_while_writing_a_checkpoint(data, tmp_path, capsys, monkeypatch):
    """The disk fills up 100 kB into the checkpoint of step 6 (simulated below the checkpoint
    writer: its file's write() fails with ENOSPC). The error says what happened and what to do, the
    checkpoint of step 3 is untouched, no partial file is left; --resume then completes the run."""
    out = tmp_path / "run"
    saves = {"n": 0}
    real_save, real_init = ckpt.save_checkpoint, ckpt._HashingWriter.__init__

    def counting_save(*args, **kwargs):
        saves["n"] += 1
        return real_save(*args, **kwargs)

    def writer_on_a_filling_disk(self, raw):
        real_init(self, _DiskFillsUp(raw, 100_000) if saves["n"] == 2 else raw)

    monkeypatch.setattr(ckpt, "save_checkpoint", counting_save)
    monkeypatch.setattr(ckpt._HashingWriter, "__init__", writer_on_a_filling_disk)
    code, _, err = _run(capsys, data["argv"](out, *NO_GUARD))
    assert code == 1
    _error_paragraph(err, "could not write the checkpoint of step 6", "No space left on device",
                     "The checkpoint of step 3 is intact", "free disk space", "--resume")
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert assert_verified_checkpoint(out).info.step == 3
    assert cli(data["argv"](out, "--resume", *NO_GUARD)) == 0
    assert_same_curve(curve(out), data["reference"])


def test_full_disk_while_writing_metrics(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_append = MetricsLog.append

    def append(self, record):
        if record.get("step") == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_append(self, record)

    monkeypatch.setattr(MetricsLog, "append", append)
    code, _, err = _run(capsys, data["argv"](out))
    assert code == 1
    _error_paragraph(err, "after step 8", "No space left on device", "metrics.jsonl",
                     "step-00000006.json) is intact", "free disk space", "--resume")
    monkeypatch.undo()
    assert cli(data["argv"](out, "--resume")) == 0
    assert_same_curve(curve(out), data["reference"])


def test_full_disk_while_writing_the_final_model(data, tmp_path, capsys, monkeypatch):
    """Training finished and its last checkpoint is written, then the model directory does not
    fit: the error says so and --resume (zero steps left) writes the model and the report."""
    out = tmp_path / "run"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "model"))

    monkeypatch.setattr(pretrain, "save_model_dir", no_space)
    code, _, err = _run(capsys, data["argv"](out))
    assert code == 1
    _error_paragraph(err, "No space left on device", "the disk is full", "add --resume")
    monkeypatch.undo()
    assert assert_verified_checkpoint(out).info.step == STEPS
    assert cli(data["argv"](out, "--resume")) == 0
    assert (out / "model" / "config.json").is_file() and summary(out)["steps_completed"] == STEPS
    assert_same_curve(curve(out), data["reference"])


# --- an impatient user --------------------------------------------------------------------


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_batch = pretrain.MaskedLMTask.batch

    def impatient(self, step):
        if step + 1 == 5:
            os.kill(os.getpid(), signal.SIGINT)  # "save and stop, please"
            os.kill(os.getpid(), signal.SIGINT)  # "now!"
        return real_batch(self, step)

    monkeypatch.setattr(pretrain.MaskedLMTask, "batch", impatient)
    code, _, err = _run(capsys, data["argv"](out))
    assert code == 130
    assert err.startswith("bertopt pretrain: stopped by Ctrl-C (SIGINT) without saving") and "Traceback" not in err
    assert "checkpoints already written are intact" in err
    assert assert_verified_checkpoint(out).info.step == 3
    monkeypatch.undo()
    assert cli(data["argv"](out, "--resume")) == 0
    assert_same_curve(curve(out), data["reference"])


# --- a real full disk -----------------------------------------------------------------------


def _can_mount_tmpfs(directory) -> bool:
    """A user namespace in which this user may mount a tmpfs (Linux, util-linux `unshare`)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_real_full_disk_on_a_small_tmpfs(data, tmp_path):
    """No simulation: `bertopt pretrain` (a real process) writes into a 4 MB tmpfs, mounted in a
    private user namespace, where two nano checkpoints (1.9 MB each) fit and the third does not. The
    kernel's ENOSPC ends the run with the message the simulated tests check, the checkpoint of step
    6 verifies, and --resume on a roomier disk continues the curve exactly."""
    mount_point, saved = tmp_path / "small-disk", tmp_path / "saved"
    mount_point.mkdir()
    saved.mkdir()
    if not _can_mount_tmpfs(mount_point):
        pytest.skip("cannot mount a tmpfs in a user namespace here (needs unshare and unprivileged user namespaces)")
    script = ('mnt=$1; dest=$2; shift 2; mount -t tmpfs -o size=4m tmpfs "$mnt" || exit 97; '
              '"$@"; rc=$?; cp -a "$mnt/out" "$dest/"; exit $rc')
    argv = data["argv"](mount_point / "out", *NO_GUARD)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount_point), str(saved),
                           sys.executable, "-m", "bertopt", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    _error_paragraph(done.stderr, "could not write the checkpoint of step 9", "No space left on device",
                     "The checkpoint of step 6 is intact", "free disk space", "--resume")
    out = saved / "out"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert assert_verified_checkpoint(out).info.step == 6
    assert cli(data["argv"](out, "--resume", *NO_GUARD)) == 0
    assert_same_curve(curve(out), data["reference"])
