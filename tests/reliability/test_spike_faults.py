"""--on-spike rewind in real `bertopt pretrain` processes: a poisoned batch is rewound and skipped
(with gradient accumulation), the run then equals a clean run that never read it; SIGKILL in the
middle of the rewind and --resume end the same; too many spikes exit 1 with a clear message."""

from __future__ import annotations

import signal

import pytest

from _faults import Launcher, assert_same_curve, assert_verified_checkpoint, curve, pretrain_argv, summary, write_corpus
from _spike_child import run_poisoned

STEPS = 30
# 0-based data steps: optimizer steps 24-25 meet them, and the second makes the spike (the default
# --spike-patience 2); the checkpoint of step 20 precedes them
POISON = (23, 24)
# --spike-lr-factor 1: the rewound run keeps the LR, so it can equal the clean one
GUARD = ("--on-spike", "rewind", "--spike-window", "10", "--spike-lr-factor", "1", "--grad-accum-steps", "2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A launcher, a corpus, and two finished runs: poisoned (and rewound) and clean."""
    base = tmp_path_factory.mktemp("spike")
    launcher = Launcher()
    corpus, cache = write_corpus(base / "corpus"), base / "cache"

    def argv(out, *extra):
        return pretrain_argv(corpus, cache, out, *GUARD, *extra, steps=STEPS, save_every=4, log_every=2,
                             eval_every=20)

    def run(out, *extra, kill_in_rewind=None, **poisoning):
        process = launcher.context.Process(target=run_poisoned, args=(argv(out, *extra), str(out) + ".log"),
                                           kwargs=dict(kill_in_rewind=kill_in_rewind, **poisoning), daemon=True)
        process.start()
        process.join(120)
        assert process.exitcode is not None, f"did not finish in 120 s: {out}.log"
        return process.exitcode

    assert run(base / "poisoned", poison=POISON) == 0, (base / "poisoned.log").read_text()
    assert run(base / "clean", skip=POISON) == 0, (base / "clean.log").read_text()
    return run, base


def _without_events(records):
    return [r for r in records if set(r) != {"step"}]  # an event record has none of the curve's keys


def test_a_poisoned_batch_is_rewound_skipped_and_the_run_equals_a_clean_one(setup):
    """The spike is caught at the second poisoned batch (--spike-patience 2); the run goes back
    to the checkpoint of step 20, skips both batches, and its curve and final model then equal
    those of a clean run whose data order never held them (rel 1e-6, in practice bit-identical)."""
    _, base = setup
    [event] = summary(base / "poisoned")["rewinds"]
    assert (event["detected_step"], event["restored_step"], event["skipped_data_steps"]) == (25, 20, [23, 25])
    assert event["reason"].startswith("loss ")
    assert summary(base / "clean")["rewinds"] == []
    assert_same_curve(_without_events(curve(base / "poisoned")), curve(base / "clean"))
    assert summary(base / "poisoned")["eval_loss"] == summary(base / "clean")["eval_loss"]
    assert "warning: loss spike at step 25" in (base / "poisoned.log").read_text()


@pytest.mark.parametrize("moment", ["before", "after"])
def test_kill_9_in_the_middle_of_a_rewind_then_resume_ends_the_same(setup, tmp_path, moment):
    """SIGKILL just before or just after the rewind writes the restored step's checkpoint: the
    newest checkpoint verifies, and --resume (which meets the spike again, or continues from the
    rewound checkpoint) ends with the uninterrupted poisoned run's curve, rewinds and model."""
    run, base = setup
    out = tmp_path / "run"
    assert run(out, poison=POISON, kill_in_rewind=moment) == -signal.SIGKILL
    assert assert_verified_checkpoint(out).info.step == 20
    assert run(out, "--resume", poison=POISON) == 0, (tmp_path / "run.log").read_text()
    assert_same_curve(curve(out), curve(base / "poisoned"))
    assert summary(out)["rewinds"] == summary(base / "poisoned")["rewinds"]
    assert summary(out)["eval_loss"] == summary(base / "poisoned")["eval_loss"]


def test_more_spikes_than_max_rewinds_exit_1_naming_the_limit(setup, tmp_path):
    run, _ = setup
    out = tmp_path / "run"
    assert run(out, "--max-rewinds", "1", poison=(15, 16, 23, 24)) == 1
    text = (tmp_path / "run.log").read_text()
    assert "error: the training loss spiked at step 23" in text and "--max-rewinds 1 allows" in text
    assert "17->12" in text and "Traceback" not in text
    assert_verified_checkpoint(out)
