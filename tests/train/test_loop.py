"""The shared training loop: exact resume, signals, faults, metrics and reports."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from _toy import ToyTask, make_model, make_optimizer
from bertopt.train import checkpoint as ckpt
from bertopt.train.config import RunConfig
from bertopt.train.job import Job, NonFiniteLoss, TrainingError
from bertopt.train.loop import run_training
from bertopt.train.sampler import EpochBatchSampler
from bertopt.train.report import read_metrics

TOTAL = 20


@pytest.fixture(autouse=True)
def one_thread():
    """The toy model is tiny: threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _job(model, task, total=TOTAL, **fields):
    """A Job as a command would hand it to the loop, without export or evaluation at the start."""
    return Job(model, task, total, **{"eval_at_start": False, "plots": False, **fields})


def _run(out, *, seed=0, hook=None, resume=None, total=TOTAL, plots=False, **overrides):
    model = make_model(seed)
    optimizer, scheduler = make_optimizer(model, total)
    torch.manual_seed(1000 + seed)  # the RNG that dropout draws from (a resumed run restores it)
    job = _job(model, ToyTask(hook=hook), total, run_info={"task": "toy", "batch_size": 8},
               resume_must_match=("batch_size",), plots=plots)
    options = dict(out=out, log_every=3, eval_every=6, save_every=5, progress=False,
                   resume=None if resume is None else str(resume))
    options.update(overrides)
    result = run_training(job, RunConfig(**options), optimizer, scheduler)
    return result, model


def _losses(out):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r.get("eval_loss")) for r in read_metrics(out / "metrics.jsonl")]


def test_straight_run_writes_metrics_summary_plots_checkpoint(tmp_path):
    result, _ = _run(tmp_path, plots=True)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9, 12, 15, 18, 20]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "train_abs_error"} <= set(r)
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12, 18, 20]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["lr"] == pytest.approx(0.05 * (1 - 2 / TOTAL))  # lr used by step 3 (index 2)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_completed"] == TOTAL and summary["stopped_by"] is None
    assert summary["eval_loss"] == records[-1]["eval_loss"]
    assert {os.path.basename(p) for p in summary["plots"]} == {"loss.png", "lr.png"}
    assert [c.step for c in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [15, 20]
    assert result.checkpoint.name == "step-00000020.json"
    assert ckpt.load_checkpoint(tmp_path / "checkpoints").info.meta["data_position"] == {
        "epoch": 2, "batch_in_epoch": 4, "example_offset": 32}


def test_crash_then_resume_equals_uninterrupted(tmp_path):
    _run(tmp_path / "straight")

    def crash(step):
        if step == 13:  # after the checkpoint of step 10, in the middle of a log window (12..15)
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "resumed", hook=crash)
    result, _ = _run(tmp_path / "resumed", seed=99, resume="auto")  # different init: must be overwritten
    assert result.resumed_from == 10
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")  # exact, dropout included


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_and_stops_then_resume_equals_uninterrupted(tmp_path, signum):
    _run(tmp_path / "straight")
    before = signal.getsignal(signum)

    def interrupt(step):
        if step == 7:
            os.kill(os.getpid(), signum)

    result, _ = _run(tmp_path / "resumed", hook=interrupt)
    name = signal.Signals(signum).name
    assert result.stopped_by == name and result.step == 8
    assert ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoints").info.step == 8
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["stopped_by"] == name
    assert signal.getsignal(signum) is before  # handlers restored
    result, _ = _run(tmp_path / "resumed", seed=5, resume=tmp_path / "resumed" / "checkpoints")
    assert result.resumed_from == 8 and result.step == TOTAL
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_nonfinite_loss_stops_with_the_step_and_keeps_checkpoint(tmp_path):
    def poison(step):
        if step == 11:
            task_ref.x[:] = float("nan")

    task_ref = None

    def hook(step):
        poison(step)

    model = make_model()
    optimizer, scheduler = make_optimizer(model, TOTAL)
    task_ref = ToyTask(hook=hook)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 12.*step-00000010.json"):
        run_training(_job(model, task_ref), RunConfig(out=tmp_path, save_every=5, eval_every=0, progress=False),
                     optimizer, scheduler)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ckpt.load_checkpoint(tmp_path / "checkpoints").info.step == 10


def test_unwritable_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    real_save = ckpt.save_checkpoint

    def full_disk_after_first(directory, step, state, **kw):
        if step > 5:
            raise OSError(28, "No space left on device")
        return real_save(directory, step, state, **kw)

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk_after_first)
    with pytest.raises(TrainingError, match=r"step 10 .*No space left.*step 5 is intact.*--resume"):
        _run(tmp_path)


def test_resume_refuses_a_different_run(tmp_path):
    _run(tmp_path, total=6)
    model = make_model()
    optimizer, scheduler = make_optimizer(model, TOTAL)
    job = _job(model, ToyTask(), run_info={"batch_size": 16}, resume_must_match=("batch_size",))
    with pytest.raises(ckpt.CheckpointError, match="batch_size=8 but this run has batch_size=16"):
        run_training(job, RunConfig(out=tmp_path, progress=False, resume="auto"), optimizer, scheduler)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="total steps"):
        Job(make_model(), ToyTask(), 0)
    with pytest.raises(ValueError, match="--save-every"):
        RunConfig(out=tmp_path, save_every=-1)


def test_epoch_batch_sampler():
    sampler = EpochBatchSampler(10, 4, seed=3)
    assert sampler.steps_per_epoch == 2
    epoch0 = np.concatenate([sampler.indices(0), sampler.indices(1)])
    assert len(set(epoch0.tolist())) == 8  # no repeats within an epoch; 2 examples dropped
    assert not np.array_equal(sampler.global_indices(0), sampler.global_indices(2))  # reshuffled
    assert sampler.position(5) == {"epoch": 2, "batch_in_epoch": 1, "example_offset": 4}
    ranks = [EpochBatchSampler(10, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for step in range(5):
        assert np.array_equal(np.concatenate([r.indices(step) for r in ranks]), sampler.global_indices(step))
    with pytest.raises(ValueError, match="divisible"):
        EpochBatchSampler(10, 3, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        EpochBatchSampler(3, 4)


def test_choose_threads(monkeypatch):
    from bertopt.train import distributed

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (0.2, 0, 0))
    assert distributed.choose_threads(0) == 4
    assert distributed.choose_threads(0, world_size=2) == 2
    assert distributed.choose_threads(3) == 3  # explicit wins
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (3.4, 0, 0))
    assert distributed.choose_threads(0) == 1  # busy machine: one thread, no spinning
    with pytest.raises(ValueError, match="--threads"):
        distributed.choose_threads(-1)


# --- mixed precision ----------------------------------------------------------------------------


def test_fp16_run_keeps_the_scaler_state_in_checkpoints_and_resumes_exactly(tmp_path):
    """The GradScaler path (CUDA's fp16 recipe, run here on CPU): training goes through the scaler,
    its state is in every checkpoint, and a crashed run resumed from one logs the same curve."""
    import bertopt
    from bertopt.train.precision import MixedPrecision

    def run(out, *, resume=None, hook=None):
        model = make_model(0)
        optimizer = bertopt.BertAdam(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        torch.manual_seed(1000)
        config = RunConfig(out=out, log_every=2, save_every=5, eval_every=0, progress=False, resume=resume,
                           precision="fp16")
        amp = MixedPrecision("fp16", "cpu")  # for_device() refuses fp16 on a CPU; the mechanics are the same
        run_training(_job(model, ToyTask(hook=hook)), config, optimizer, scheduler, amp=amp)
        return amp

    amp = run(tmp_path / "straight")
    records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    # the first steps overflow at the initial scale 2**16 and are skipped until the scale fits:
    # each skip halves it (no growth within 2000 good steps)
    halvings = math.log2(2.0**16 / amp.scaler.get_scale())
    assert records[-1]["skipped_steps"] == halvings >= 1
    saved = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints").state
    assert saved["scaler"]["scale"] == amp.scaler.get_scale()

    def crash(step):
        if step == 13:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", hook=crash)
    run(tmp_path / "resumed", resume="auto")
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")


def test_fp16_gradient_overflow_skips_the_update(tmp_path, monkeypatch):
    import bertopt
    from bertopt.train.loop import Training, train_step
    from bertopt.train.state import LoopState
    from bertopt.train.distributed import DistContext
    from bertopt.train.precision import MixedPrecision

    model = make_model(0)
    optimizer = bertopt.BertAdam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    amp = MixedPrecision("fp16", "cpu")
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # no overflow until we make one
    run = Training(model, optimizer, scheduler, _job(model, ToyTask(), 5), RunConfig(out=tmp_path), DistContext(),
                   amp, eval_every=0)
    state = LoopState()
    train_step(run, state)
    assert state.overflow_steps == 0 and int(optimizer.state[model[0].weight]["step"]) == 1
    before = [p.detach().clone() for p in model.parameters()]
    scale = amp.scaler.get_scale()
    # an overflowing backward: gradients of the scaled loss reach inf in one parameter
    model[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    train_step(run, state)
    assert state.overflow_steps == 1 and state.skipped_steps(optimizer) == 1
    assert amp.scaler.get_scale() == scale / 2  # the scaler backs off
    assert int(optimizer.state[model[0].weight]["step"]) == 1  # the optimizer did not count it
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    from bertopt.train.precision import MixedPrecision

    seen = []
    result, model = _run(tmp_path, precision="bf16")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with MixedPrecision("bf16", "cpu").autocast():
        seen.append(model(torch.randn(2, 8)).dtype)
    assert seen == [torch.bfloat16]


def test_fp16_on_a_cpu_is_a_clear_error():
    from bertopt.train.precision import MixedPrecision

    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU.*--precision bf16"):
        MixedPrecision.for_device("fp16", torch.device("cpu"))


def test_bf16_on_a_cpu_without_bf16_units_gets_a_note(monkeypatch):
    from bertopt.train import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert "no bfloat16 units" in precision.precision_note("bf16", torch.device("cpu"))
    assert precision.precision_note("fp32", torch.device("cpu")) is None
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert precision.precision_note("bf16", torch.device("cpu")) is None


@pytest.mark.parametrize("optimizer_name", ["bert_adam", "sgd"])
def test_logged_grad_norm_under_fp16_is_the_unscaled_norm(tmp_path, optimizer_name):
    """fp16's GradScaler multiplies the loss (here by 1024); the logged norm is that of the true mean
    gradient, whether the optimizer reports it (BertAdam, from its first step on) or the loop
    computes it (SGD), and before clipping."""
    import bertopt
    from bertopt.optim.clip import global_grad_norm
    from bertopt.train.distributed import DistContext
    from bertopt.train.loop import Training, train_step
    from bertopt.train.precision import MixedPrecision
    from bertopt.train.state import LoopState

    def optimizer_for(model):
        if optimizer_name == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.01)
        return bertopt.BertAdam(model.parameters(), lr=0.01, max_grad_norm=1e-3)  # clips: the norm is before

    reference = make_model(0).eval()  # no dropout, so both see the same function
    task = ToyTask()
    x, y = task.batch(0)
    ((reference(x) - y) ** 2).mean().backward()
    expected = float(global_grad_norm([p.grad for p in reference.parameters()]))

    model = make_model(0).eval()  # train_step leaves the mode alone: no dropout
    optimizer = optimizer_for(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    amp = MixedPrecision("fp16", "cpu")
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    run = Training(model, optimizer, scheduler, _job(model, task, 5), RunConfig(out=tmp_path), DistContext(), amp,
                   eval_every=0)
    stats = train_step(run, LoopState())
    assert amp.scaler.get_scale() == 1024.0  # no overflow: the step was applied
    assert stats.grad_norm == pytest.approx(expected, rel=1e-2)  # fp16 forward: not bit-equal; scaled would be 1024x
