"""Real processes, real signals: kill -9 at random moments, Ctrl-C and SIGTERM during training.

Every kill is followed by ``--resume``; the killed-and-resumed run must log exactly the metrics of
an uninterrupted run, and after every kill the checkpoint directory must verify.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from _faults import (Launcher, assert_prefix_of, assert_same_curve, assert_verified_checkpoint, curve, latest_step,
                     pretrain_argv, summary, wait_for, write_corpus)

STEPS = 200  # long enough that ten kills fit before the end (~10 steps per launch)
SAVE_EVERY = 4
KILLS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A launcher, a corpus and the uninterrupted reference run."""
    base = tmp_path_factory.mktemp("kill")
    launcher = Launcher()
    corpus, cache = write_corpus(base / "corpus"), base / "cache"

    def argv(out, *extra, steps=STEPS):
        return pretrain_argv(corpus, cache, out, *extra, steps=steps, save_every=SAVE_EVERY, log_every=2,
                             eval_every=20)

    reference = base / "reference"
    assert launcher.run(argv(reference), base / "reference.log") == 0
    return launcher, argv, curve(reference), base


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_continues_the_curve(setup, tmp_path):
    """SIGKILL a training process at >= 10 random moments (seeded); after each kill the newest
    checkpoint verifies and the metrics logged so far are the reference's; each restart uses
    --resume; the finished run's metrics equal the uninterrupted run's (rel 1e-6)."""
    launcher, argv, reference, _ = setup
    rng = random.Random(20240607)
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    kills, moments, launches = 0, [], 0
    while kills < KILLS:
        assert launches < 3 * KILLS, f"only {kills} kills in {launches} launches; log: {log}"
        before = latest_step(out)
        process = launcher.start(argv(out, *(["--resume"] if launches else [])), log)
        launches += 1
        if rng.random() < 0.3:
            # anywhere in the first 0.4 s: loading data, building the model, resuming, first steps
            delay = rng.uniform(0.0, 0.4)
            process.join(delay)
            moment = f"{delay:.2f}s after start"
        else:
            # a random moment after the process wrote a new checkpoint: in a step, an evaluation,
            # a metrics line or the next checkpoint (one every ~4 steps)
            wait_for(lambda: latest_step(out) > before, timeout=60, process=process)
            delay = rng.uniform(0.0, 0.08)
            process.join(delay)
            moment = f"{delay:.3f}s after checkpoint {latest_step(out)}"
        if process.exitcode is not None:  # finished (or failed) before the kill
            assert process.exitcode == 0, f"exit {process.exitcode}; log: {log}"
            break
        process.kill()  # SIGKILL: no handler, no cleanup
        process.join()
        assert process.exitcode == -signal.SIGKILL
        kills += 1
        mid_save = any(p.name.startswith(".step-") for p in (out / "checkpoints").glob(".*"))
        moments.append(moment + (" (mid-save)" if mid_save else ""))
        # the run so far is a prefix of the reference, and what remains on disk is resumable
        assert_prefix_of(curve(out), reference)
        if latest_step(out) >= 0:
            assert assert_verified_checkpoint(out).info.step == latest_step(out)
    assert kills >= KILLS, f"the run finished after {kills} kills ({moments})"
    assert launcher.run(argv(out, "--resume"), log) == 0
    assert_same_curve(curve(out), reference)
    final = assert_verified_checkpoint(out)
    assert final.info.step == STEPS and final.state["loop"]["step"] == STEPS
    done = summary(out)
    assert done["steps_completed"] == STEPS and done["stopped_by"] is None
    assert (out / "model" / "model.safetensors").is_file()
    print(f"{kills} kills in {launches} launches at: {'; '.join(moments)}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_saves_then_exits_with_its_code(setup, tmp_path, signum, code):
    """Ctrl-C / SIGTERM to a real training process: it finishes the step, saves a verified
    checkpoint, says how to continue, exits 130 / 143 without a traceback; --resume then
    reproduces the uninterrupted run."""
    launcher, argv, reference, _ = setup
    out, log = tmp_path / "run", tmp_path / "run.log"
    process = launcher.start(argv(out, steps=STEPS), log)
    assert wait_for(lambda: latest_step(out) >= SAVE_EVERY, timeout=60, process=process)
    os.kill(process.pid, signum)
    process.join(60)
    assert process.exitcode == code
    text = log.read_text()
    assert "Traceback" not in text
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in text and "--resume" in text
    stopped = summary(out)
    assert stopped["stopped_by"] == name and stopped["steps_completed"] == latest_step(out)
    assert assert_verified_checkpoint(out).info.step == stopped["steps_completed"] < STEPS
    assert not (out / "model").exists()  # no final model from a stopped run
    assert launcher.run(argv(out, "--resume"), log) == 0
    assert_same_curve(curve(out), reference)
