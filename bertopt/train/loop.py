"""The training loop shared by ``bertopt pretrain`` and ``bertopt finetune``.

A command builds a :class:`~bertopt.train.job.Job` (model, task, length, run info, export), an
optimizer and a scheduler, then calls :func:`run_training` with its
:class:`~bertopt.train.config.RunConfig`. It reads top to bottom: :func:`~bertopt.train.resume.restore`
(or start fresh), then for each optimizer step :func:`train_step`, :func:`log_and_evaluate` and,
when due, :func:`~bertopt.train.resume.save`, then :func:`finish_run` (the final evaluation, the
model export, summary.json and plots). What survives an interruption is
:class:`~bertopt.train.state.LoopState`; the task's contract is in :mod:`bertopt.train.job`.

A step's update is :func:`apply_update`: gradients scaled to the global mean, unscaled (fp16),
then ``optimizer.step()``, which clips by the global norm and skips non-finite gradients (BertAdam,
Lamb). A non-finite training *loss* (nan/inf) never reaches the optimizer: the run stops with
:class:`~bertopt.train.job.NonFiniteLoss` naming the step (``--on-nonfinite stop``), or that update
is skipped (``skip``; ``max_consecutive_nonfinite`` in a row still stop). The checkpoint stores the
RNG states of every rank, so a resumed run continues with the same dropout masks and its loss
curve equals the uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bertopt.optim.clip import global_grad_norm
from bertopt.train import checkpoint as ckpt
from bertopt.train.config import RunConfig
from bertopt.train.distributed import DistContext, gradient_sync
from bertopt.train.job import Job, NonFiniteLoss, StepOutput, TrainingError, TrainingTask
from bertopt.train.precision import MixedPrecision
from bertopt.train.report import MetricsLog, plot_metrics, read_metrics, run_summary, write_summary
from bertopt.train.resume import intact, restore, rewind, save
from bertopt.train.spike import Verdict
from bertopt.train.state import LoopState, StepStats, Training, Window

__all__ = ["run_training", "Training", "LoopResult", "train_step", "apply_update", "TrainingError", "NonFiniteLoss",
           "StepOutput", "TrainingTask", "LoopState"]

MAX_CONSECUTIVE_NONFINITE = 10  # with --on-nonfinite skip: this many bad steps in a row stop the run


@dataclass
class LoopResult:
    step: int  # optimizer steps completed
    stopped_by: str | None  # "SIGINT" / "SIGTERM" if a signal ended the run early, else None
    resumed_from: int | None
    summary: dict[str, Any]  # what summary.json holds (empty on ranks other than 0)
    checkpoint: Path | None  # manifest of the last checkpoint written
    plots: list[Path]


class _StopRequests:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (a second SIGINT aborts)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # impatient second Ctrl-C
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --- the loop ---------------------------------------------------------------------------------


def run_training(job: Job, config: RunConfig, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 model: torch.nn.Module | None = None, ctx: DistContext | None = None,
                 amp: MixedPrecision | None = None, started: float | None = None) -> LoopResult:
    """Train ``job`` for ``job.total_steps`` optimizer steps with ``config``'s settings; see the
    module docstring. ``model`` is ``job.model`` as wrapped for training (default: itself); ``amp``
    defaults to ``config.precision`` on the context's device; ``started`` (a ``time.perf_counter()``
    value) is when the command began, for summary.json's wall time (default: now)."""
    started = time.perf_counter() if started is None else started
    ctx = ctx or DistContext()
    amp = amp or MixedPrecision.for_device(config.precision, ctx.device)
    run = Training(model if model is not None else job.model, optimizer, scheduler, job, config, ctx, amp,
                   eval_every=job.eval_every(config.eval_every))
    if ctx.is_main:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    state = restore(run)
    metrics = MetricsLog(Path(config.out) / "metrics.jsonl", resume_step=state.resumed_from, enabled=ctx.is_main)
    from tqdm.auto import tqdm

    bar = tqdm(total=job.total_steps, initial=state.step, desc=job.title or "train", unit="step",
               disable=not (config.progress and ctx.is_main), dynamic_ncols=True, smoothing=0.1)
    run.model.train()  # from_pretrained() returns a model in eval mode
    guarded = config.on_spike == "rewind"
    try:
        if job.eval_at_start and state.resumed_from is None and hasattr(run.task, "evaluate"):
            metrics.append({"step": 0, "lr": _current_lr(optimizer), **evaluate(run)})
        if guarded and state.resumed_from is None:
            state.last_checkpoint = save(run, state)  # a spike before the first --save-every can rewind to it
        _log_rewinds(state, metrics)  # a run killed between a rewind's checkpoint and its record
        with _StopRequests() as stop:
            while state.step < job.total_steps:
                stats = train_step(run, state, stop_requested=lambda: stop.signal_name is not None)
                state.first_step_s = state.first_step_s or stats.seconds
                if guarded and (verdict := _judge(run, state, stats)).spike:
                    state = rewind(run, state, verdict.reason)
                    metrics.rewind_to(state.step)
                    _log_rewinds(state, metrics)
                    _warn_rewind(run, state)
                    bar.n = state.step
                    continue
                log_and_evaluate(run, state, stats, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{stats.lr:.2e}",
                                tok_s=f"{stats.tokens / max(stats.seconds, 1e-9):,.0f}", refresh=False)
                if stats.stop_requested or state.step == job.total_steps or (
                        config.save_every and state.step % config.save_every == 0):
                    state.last_checkpoint = save(run, state) or state.last_checkpoint
                if stats.stop_requested:
                    state.stopped_by = stop.signal_name or "SIGTERM"  # another rank's signal: preemption
                    break
    except OSError as exc:  # e.g. metrics.jsonl on a full disk (checkpoint writes raise TrainingError)
        raise TrainingError(
            f"after step {state.step}: {exc}. {intact(state.last_checkpoint, run.checkpoint_dir, sentence_start=True)}; "
            "fix that (free disk space, check permissions), then run the same command again with --resume"
        ) from exc
    finally:
        bar.close()
        metrics.close()
    return finish_run(run, state, started)


def train_step(run: Training, state: LoopState, *, stop_requested: Callable[[], bool] = lambda: False) -> StepStats:
    """One optimizer step: K micro-batches forward and backward (gradients all-reduced on the last
    only), then :func:`apply_update`, unless the loss is non-finite."""
    model, task, ctx, amp = run.model, run.task, run.ctx, run.amp
    started = time.perf_counter()
    batch = task.batch(state.spike.data_step(state.step))  # the step itself unless spikes were skipped
    parts = task.split(batch, run.config.grad_accum_steps) if run.config.grad_accum_steps > 1 else [batch]
    outputs = []
    for i, part in enumerate(parts):
        with gradient_sync(model, enabled=i == len(parts) - 1), amp.autocast():
            out = task.forward(model, part)
        amp.scaler.scale(out.loss_sum).backward()
        outputs.append(out)
    stats = _sum_over_processes(outputs, stop_requested(), ctx)  # a signal on any rank stops every rank
    stats.lr = _current_lr(run.optimizer)
    if stats.count <= 0:
        raise TrainingError(f"step {state.step + 1}: the batch has no loss terms (count 0)")
    if math.isfinite(stats.loss):
        state.nonfinite_in_a_row = 0
        stats.grad_norm = apply_update(run, state, stats.count)
    else:  # the update is never applied: parameters and moments stay as they were
        _on_nonfinite_loss(stats.loss, state.step + 1, run, state)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    stats.seconds = time.perf_counter() - started
    state.train_time += stats.seconds
    state.add_to_window(stats)
    return stats


def apply_update(run: Training, state: LoopState, count: float) -> float:
    """The optimizer step of a finite loss; returns the global gradient norm (of the mean gradient,
    unscaled, before clipping; inf when fp16 gradients overflowed).

    1. scale the gradients (a sum over this rank's terms; DDP/FSDP average over ranks) to the mean
       over the global batch's ``count`` terms;
    2. fp16: unscale them (GradScaler records whether any is inf/nan);
    3. step: the optimizer clips by the global norm and skips non-finite gradients itself (BertAdam,
       Lamb: counted in its ``skipped_steps``); GradScaler skips the step after an fp16 overflow
       (counted in ``state.overflow_steps``) and lowers the scale.
    """
    model, optimizer, scaler = run.model, run.optimizer, run.amp.scaler
    factor = run.ctx.world_size / count
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    reports_norm = hasattr(optimizer, "last_grad_norm")  # BertAdam, Lamb: computed within the step
    norm = None if reports_norm else float(global_grad_norm([p.grad for p in model.parameters() if p.grad is not None]))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    if scale_before is not None and scaler.get_scale() < scale_before:
        state.overflow_steps += 1  # GradScaler found inf/nan and did not call the optimizer
        return float("inf")
    return norm if norm is not None else _as_float(optimizer.last_grad_norm)


def _sum_over_processes(outputs: list[StepOutput], stop_requested: bool, ctx: DistContext) -> StepStats:
    """The micro-batches' loss sums, counts, tokens and task sums, added over all processes in one
    all-reduce (with the stop votes)."""
    names = sorted({name for out in outputs for name in out.sums})
    local = [0.0] * (3 + len(names))  # added in Python floats, micro-batch by micro-batch
    for out in outputs:
        values = (out.count, out.loss_sum.detach(), out.tokens, *(out.sums.get(name, 0.0) for name in names))
        local = [total + _as_float(value) for total, value in zip(local, values)]
    local.append(float(stop_requested))
    local = torch.tensor(local, dtype=torch.float64)
    count, loss_sum, tokens, *sums, votes = ctx.all_reduce_sum(local).tolist()
    return StepStats(loss_sum=loss_sum, count=count, tokens=tokens, sums=dict(zip(names, sums)), lr=float("nan"),
                     grad_norm=float("nan"), seconds=0.0, stop_requested=votes > 0)


def log_and_evaluate(run: Training, state: LoopState, stats: StepStats, metrics: MetricsLog) -> None:
    """A metrics.jsonl record every ``log_every`` steps (and at evaluations and the end), with the
    window's averages; evaluation every ``eval_every`` steps and at the end. A signal forces no
    record: the window goes into the checkpoint, so a resumed run logs what an uninterrupted would."""
    step, eval_every = state.step, run.eval_every
    is_last = step == run.job.total_steps
    evaluating = hasattr(run.task, "evaluate") and (is_last or (eval_every and step % eval_every == 0))
    if not (is_last or evaluating or step % run.config.log_every == 0):
        return
    window, elapsed = state.window, time.perf_counter() - state.window_start
    averaged = window.count > 0  # else every step of the window was skipped
    record = {"step": step, "loss": window.loss_sum / window.count if averaged else float("nan"),
              "lr": stats.lr, "grad_norm": stats.grad_norm,
              "tokens_per_s": window.tokens / elapsed if elapsed > 0 else float("nan"),
              "train_time_s": state.train_time}
    for name, value in window.sums.items():
        record[f"train_{name}"] = value / window.count if averaged else float("nan")
    skipped = state.skipped_steps(run.optimizer)
    if skipped is not None:
        record["skipped_steps"] = skipped
    if run.config.on_nonfinite == "skip":
        record["nonfinite_loss_steps"] = state.nonfinite_total
    if evaluating:
        state.last_eval = evaluate(run)
        record.update(state.last_eval)
    metrics.append(record)
    state.window, state.window_start = Window(), time.perf_counter()


def evaluate(run: Training, measure: Callable | None = None) -> dict[str, float]:
    """``measure(model)`` (default: the task's evaluate) in eval mode, without gradients, under the
    run's autocast; the model is back in training mode afterwards."""
    run.model.eval()
    with torch.no_grad(), run.amp.autocast():
        results = {k: float(v) for k, v in (measure or run.task.evaluate)(run.model).items()}
    run.model.train()
    return results


def finish_run(run: Training, state: LoopState, started: float) -> LoopResult:
    """After the last step (or a signal): the job's final evaluation and the model export (unless a
    signal stopped the run), the plots, then summary.json, written once, and the job's report."""
    job, ctx, out_dir = run.job, run.ctx, Path(run.config.out)
    finished = state.stopped_by is None
    final_fields = evaluate(run, job.finish) if job.finish is not None and finished else {}
    model_state = ckpt.get_model_state(run.model) if job.export is not None else None  # collective under FSDP2
    summary: dict[str, Any] = {}
    plots: list[Path] = []
    if ctx.is_main:
        model_dir = None
        if model_state is not None and finished:
            model_dir = ckpt.export_atomically(lambda d: job.export(model_state, d), out_dir / "model")
        records = read_metrics(out_dir / "metrics.jsonl")
        if job.plots:
            plots = plot_metrics(records, out_dir, title=job.title, eval_loss_key=job.plot_eval_loss,
                                 eval_metric_key=job.plot_eval_metric)
        summary = run_summary(
            records, title=job.title, steps_completed=state.step, total_steps=job.total_steps,
            stopped_by=state.stopped_by, resumed_from=state.resumed_from, last_eval=state.last_eval,
            final_fields=final_fields, train_time=state.train_time, first_step_s=state.first_step_s,
            processes=ctx.world_size, checkpoint=state.last_checkpoint, metrics=out_dir / "metrics.jsonl",
            run_info=job.run_info, plots=plots, extra=job.summary, model_dir=model_dir,
            wall_time_s=time.perf_counter() - started, rewinds=state.spike.rewinds)
        write_summary(out_dir / "summary.json", summary)
        if job.report is not None:
            job.report(summary, out_dir)
    ctx.barrier()
    return LoopResult(step=state.step, stopped_by=state.stopped_by, resumed_from=state.resumed_from,
                      summary=summary, checkpoint=state.last_checkpoint, plots=plots)


# --- helpers ----------------------------------------------------------------------------------


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _as_float(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _judge(run: Training, state: LoopState, stats: StepStats) -> Verdict:
    """Is the step just finished a loss spike? (every rank decides alike: the loss is all-reduced
    and the gradient norm global)."""
    config = run.config
    return state.spike.judge(state.step, stats.loss, stats.grad_norm, window=config.spike_window,
                             loss_mads=config.spike_loss_mads, min_rise=config.spike_min_rise,
                             grad_ratio=config.spike_grad_ratio, patience=config.spike_patience)


def _log_rewinds(state: LoopState, metrics: MetricsLog) -> None:
    """A metrics.jsonl record ``{"step": restored, "event": "rewind", ...}`` of each rewind that has
    none yet (the record is written after the rewind's checkpoint: a kill between them loses it)."""
    logged = {r.get("rewind") for r in metrics.records if r.get("event") == "rewind"}
    for event in state.spike.rewinds:
        if event["rewind"] not in logged:
            metrics.append({"step": event["restored_step"], "event": "rewind", **event})


def _warn_rewind(run: Training, state: LoopState) -> None:
    if run.ctx.is_main:
        e = state.spike.rewinds[-1]
        print(f"warning: loss spike at step {e['detected_step']} ({e['reason']}); rewound to the checkpoint of "
              f"step {e['restored_step']} and skipping {e['batches_skipped']} batch(es) (data steps "
              f"{e['skipped_data_steps'][0]} to {e['skipped_data_steps'][1] - 1}); rewind {e['rewind']} of at most "
              f"{run.config.max_rewinds}", flush=True)


def _on_nonfinite_loss(loss: float, step: int, run: Training, state: LoopState) -> None:
    """Count the skipped update; stop (NonFiniteLoss naming the step) or, with on_nonfinite="skip",
    warn and carry on until too many come in a row."""
    state.nonfinite_total += 1
    state.nonfinite_in_a_row += 1
    in_a_row = state.nonfinite_in_a_row
    where = intact(state.last_checkpoint, run.checkpoint_dir)
    advice = ("Lower --lr (or keep --max-grad-norm on), check the data, then resume from the checkpoint with "
              "--resume")
    if run.config.on_nonfinite == "stop":
        raise NonFiniteLoss(
            f"the training loss is {loss} at step {step}; this update was not applied and {where}. "
            f"{advice} (or pass --on-nonfinite skip to skip such steps)"
        )
    if in_a_row >= MAX_CONSECUTIVE_NONFINITE:
        raise NonFiniteLoss(
            f"the training loss was non-finite at {in_a_row} steps in a row (steps {step - in_a_row + 1} to "
            f"{step}, last value {loss}); none of them was applied and {where}. {advice}"
        )
    if run.ctx.is_main:
        print(f"warning: the training loss is {loss} at step {step}; skipped this update "
              f"({in_a_row} in a row, at most {MAX_CONSECUTIVE_NONFINITE - 1} allowed)", flush=True)
