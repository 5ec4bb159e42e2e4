"""--on-spike rewind: detection, the rewind to a checkpoint from before the spike, the skipped
batches, the limit on rewinds, and crashes in the middle of a rewind (bertopt.train.spike)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _toy import ToyTask, make_model, make_optimizer
from bertopt.errors import EXIT_FAILED, exit_code
from bertopt.train import checkpoint as ckpt
from bertopt.train import resume
from bertopt.train.config import RunConfig
from bertopt.train.job import Job, LossSpike
from bertopt.train.loop import run_training
from bertopt.train.report import read_metrics
from bertopt.train.spike import SpikeState

TOTAL = 30
POISONED = {17}  # 1-based data steps whose loss (and so gradient) the fault multiplies by 100
# The toy run is short: judge from the 10 steps before. Batches of 32 of its 64 examples: with 8,
# the loss (an MSE) swings by 3x from batch to batch, far more than BERT's (docs/reliability.md).
BATCH = 32
# A poisoned batch here is one step: act on it at once (--spike-patience 1); keep the LR, so the
# rewound run can equal the clean one.
DETECTOR = dict(spike_window=10, spike_min_rise=1.0, spike_patience=1, spike_lr_factor=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SkippingToyTask(ToyTask):
    """The clean reference: a run that never sees the data steps in ``skip`` (0-based)."""

    def __init__(self, skip: set[int]):
        super().__init__(batch_size=BATCH)
        self.order = [s for s in range(3 * TOTAL) if s not in skip]

    def batch(self, step):
        return super().batch(self.order[step])


def _run(out, *, task=None, resume_from=None, **overrides):
    model = make_model(0)
    optimizer, scheduler = make_optimizer(model, TOTAL)
    torch.manual_seed(1000)
    job = Job(model, task or ToyTask(batch_size=BATCH), TOTAL, eval_at_start=False, plots=False,
              run_info={"task": "toy"})
    options = dict(out=out, log_every=3, eval_every=6, save_every=5, progress=False, on_spike="rewind",
                   resume=resume_from, **DETECTOR)
    options.update(overrides)
    result = run_training(job, RunConfig(**options), optimizer, scheduler)
    return result, model


def _poison(fault_at_steps, steps=POISONED, factor=100.0, *, loss=None):
    """Multiply the loss (and so the gradient) of the given data steps by ``factor``, or scale it
    to the value ``loss``."""
    def scale(out):
        out.loss_sum = out.loss_sum * (factor if loss is None else loss * out.count / float(out.loss_sum))
    fault_at_steps(ToyTask, steps, scale)


def _curve(out):
    keys = ("loss", "lr", "grad_norm", "eval_loss", "train_abs_error")
    return [{k: r[k] for k in ("step", *keys) if k in r} for r in read_metrics(out / "metrics.jsonl")
            if "event" not in r]


def _same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_data_steps_skip_the_merged_ranges():
    spike = SpikeState()
    assert [spike.data_step(s) for s in range(4)] == [0, 1, 2, 3]
    spike.skip(3, 5)
    spike.skip(8, 9)
    spike.skip(4, 6)  # overlaps the first: merged
    assert spike.skipped == [[3, 6], [8, 9]]
    assert [spike.data_step(s) for s in range(7)] == [0, 1, 2, 6, 7, 9, 10]


def test_detector_ignores_noise_and_skipped_updates_and_flags_a_jump():
    spike, options = SpikeState(), dict(window=50, loss_mads=12.0, min_rise=0.25, grad_ratio=20.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 201):  # a falling, noisy loss: no verdict
        loss = 5.0 - step / 100 + 0.1 * float(torch.randn(1, generator=gen))
        assert not spike.judge(step, loss, 1.0 + 0.2 * float(torch.rand(1, generator=gen)), **options).spike
    history = list(spike.losses)
    assert not spike.judge(201, float("nan"), float("nan"), **options).spike  # non-finite loss: skipped
    assert not spike.judge(202, 3.0, math.inf, **options).spike  # fp16 overflow: not a spike
    assert spike.losses == history
    assert spike.judge(203, 3.0, 25.0, **options).spike  # gradient norm 20x+ the median
    jump = spike.judge(204, 6.0, 1.0, **options)
    assert jump.spike and "loss 6" in jump.reason
    assert spike.losses == history and spike.elevated_since == 203


def test_patience_leaves_a_single_wild_step_alone():
    spike, options = SpikeState(), dict(window=20, loss_mads=12.0, min_rise=0.25, grad_ratio=20.0, patience=2)
    for step in range(1, 21):
        spike.judge(step, 5.0 + 0.01 * (step % 3), 1.0, **options)
    assert not spike.judge(21, 9.0, 1.0, **options).spike  # one wild step...
    assert not spike.judge(22, 5.0, 1.0, **options).spike and spike.elevated_since is None  # ...that heals
    assert not spike.judge(23, 9.0, 1.0, **options).spike
    assert spike.judge(24, 9.0, 1.0, **options).spike and spike.elevated_since == 23  # two in a row


def test_elevated_steps_open_the_window_and_keep_its_checkpoint(tmp_path, fault_at_steps):
    """Steps 16-17 at loss 2.6 are elevated (above half the bar: the median is 0.87, the bar 12
    MADs, 2.4) and step 18 at 100x its loss spikes: the window starts at 16, so the run goes back
    to the checkpoint of step 12, which --keep-checkpoints 1 would have pruned when step 16 was
    saved, and skips data steps 16-18."""
    clean, clean_model = _run(tmp_path / "clean", task=SkippingToyTask({15, 16, 17}), on_spike="off")
    _poison(fault_at_steps, {16, 17}, loss=2.6)
    _poison(fault_at_steps, {18})
    result, model = _run(tmp_path / "spiked", spike_min_rise=0.0, save_every=4, keep_checkpoints=1)
    [event] = result.summary["rewinds"]
    assert (event["spike_started_step"], event["detected_step"], event["restored_step"]) == (16, 18, 12)
    assert event["skipped_data_steps"] == [15, 18] and event["batches_skipped"] == 3
    assert _same_parameters(model, clean_model)
    assert _curve(tmp_path / "spiked") == _curve(tmp_path / "clean")
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "spiked" / "checkpoints")] == [TOTAL]


def test_poisoned_batch_is_rewound_skipped_and_the_run_equals_a_clean_one(tmp_path, fault_at_steps):
    """The run meets the poisoned batch at step 17, restores step 15 and skips that batch; it
    then equals, bit for bit, a clean run whose data order never held it: the restored checkpoint
    is that run's state at step 15 (RNG included) and the batch of every later step is the same."""
    clean, clean_model = _run(tmp_path / "clean", task=SkippingToyTask({16}), on_spike="off")
    _poison(fault_at_steps)
    result, model = _run(tmp_path / "spiked")
    assert result.summary["rewinds"] == [{
        "rewind": 1, "detected_step": 17, "restored_step": 15, "spike_started_step": 17,
        "skipped_data_steps": [16, 17], "batches_skipped": 1, "reason": result.summary["rewinds"][0]["reason"],
        "lr_scale": 1.0}]
    assert result.summary["rewinds"][0]["reason"].startswith("loss ")
    assert result.step == TOTAL and _same_parameters(model, clean_model)
    assert _curve(tmp_path / "spiked") == _curve(tmp_path / "clean")
    events = [r for r in read_metrics(tmp_path / "spiked" / "metrics.jsonl") if "event" in r]
    assert [(e["step"], e["event"], e["detected_step"]) for e in events] == [(15, "rewind", 17)]
    assert json.loads((tmp_path / "spiked" / "summary.json").read_text())["rewinds"] == result.summary["rewinds"]
    saved = ckpt.load_checkpoint(tmp_path / "spiked" / "checkpoints")
    assert saved.state["loop"]["spike"]["skipped"] == [[16, 17]]
    assert saved.info.meta["data_position"] == ToyTask(batch_size=BATCH).data_position(TOTAL + 1)


def test_a_clean_run_never_rewinds_and_trains_as_without_the_guard(tmp_path):
    guarded, guarded_model = _run(tmp_path / "guarded")
    plain, plain_model = _run(tmp_path / "plain", on_spike="off")
    assert guarded.summary["rewinds"] == [] and plain.summary["rewinds"] == []
    assert _same_parameters(guarded_model, plain_model)
    assert _curve(tmp_path / "guarded") == _curve(tmp_path / "plain")


def test_the_lr_factor_lowers_the_rest_of_the_schedule(tmp_path, fault_at_steps):
    _, _ = _run(tmp_path / "clean", task=SkippingToyTask({16}), on_spike="off")
    _poison(fault_at_steps)
    result, _ = _run(tmp_path / "spiked", spike_lr_factor=0.5)
    assert result.summary["rewinds"][0]["lr_scale"] == 0.5
    lrs = {r["step"]: r["lr"] for r in _curve(tmp_path / "clean")}
    for r in _curve(tmp_path / "spiked"):
        assert r["lr"] == pytest.approx(lrs[r["step"]] * (0.5 if r["step"] > 15 else 1.0), rel=1e-12)


def test_too_many_spikes_stop_with_a_clear_error(tmp_path, fault_at_steps):
    _poison(fault_at_steps, {13, 17, 22})
    with pytest.raises(LossSpike) as raised:
        _run(tmp_path, max_rewinds=2)
    message = str(raised.value)
    assert "spiked at step 20" in message  # data step 22 is optimizer step 20 after two skips
    assert "--max-rewinds 2 allows were used up" in message and "13->10, 16->15" in message
    assert "lower --lr" in message and exit_code(raised.value) == EXIT_FAILED
    assert [e["detected_step"] for e in json.loads(json.dumps(
        ckpt.load_checkpoint(tmp_path / "checkpoints").state["loop"]["spike"]["rewinds"]))] == [13, 16]


def test_crash_in_the_middle_of_a_rewind_then_resume_ends_the_same(tmp_path, fault_at_steps, monkeypatch):
    """Killed after the rewind deleted the newer checkpoints but before it saved the restored step
    again, or after that save but before metrics.jsonl got its record: --resume ends in the state
    of the run that was never interrupted (parameters equal, same records, one rewind event)."""
    _poison(fault_at_steps, {19})
    _, reference = _run(tmp_path / "straight", save_every=4)  # spike at 19: back to step 16
    real_save = resume.save

    for crash_after_save in (False, True):
        out = tmp_path / f"crash-{crash_after_save}"

        def crashing_save(run, state):
            if state.spike.rewinds:  # the save inside rewind()
                if crash_after_save:
                    real_save(run, state)
                raise RuntimeError("simulated crash")
            return real_save(run, state)

        monkeypatch.setattr(resume, "save", crashing_save)
        with pytest.raises(RuntimeError, match="simulated crash"):
            _run(out, save_every=4)
        monkeypatch.setattr(resume, "save", real_save)
        result, model = _run(out, save_every=4, resume_from="auto")
        assert _same_parameters(model, reference)
        assert _curve(out) == _curve(tmp_path / "straight")
        assert [e["detected_step"] for e in result.summary["rewinds"]] == [19]
        assert [r["rewind"] for r in read_metrics(out / "metrics.jsonl") if "event" in r] == [1]


def test_a_spike_before_the_first_save_rewinds_to_the_start(tmp_path, fault_at_steps):
    """The guard saves a checkpoint before the first step, so a spike before the first
    --save-every still has one to go back to; the run then equals the clean one."""
    _, clean_model = _run(tmp_path / "clean", task=SkippingToyTask({16}), on_spike="off", save_every=0)
    _poison(fault_at_steps)
    result, model = _run(tmp_path / "spiked", save_every=0)
    assert [(e["detected_step"], e["restored_step"]) for e in result.summary["rewinds"]] == [(17, 0)]
    assert _same_parameters(model, clean_model)


def test_no_checkpoint_left_from_before_the_spike_is_a_clear_error(tmp_path, fault_at_steps):
    def remove_checkpoints(step):
        if step == 15:  # someone deleted them while the run went on
            for path in (tmp_path / "checkpoints").iterdir():
                path.unlink()

    _poison(fault_at_steps)
    with pytest.raises(LossSpike, match="no checkpoint from before step 17 is left in .*--keep-checkpoints"):
        _run(tmp_path, task=ToyTask(batch_size=BATCH, hook=remove_checkpoints), save_every=0)
