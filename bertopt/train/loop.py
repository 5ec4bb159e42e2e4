"""The training loop shared by ``bertopt pretrain`` and ``bertopt finetune``.

A command builds a model, an optimizer, a scheduler and a :class:`TrainingTask`, then calls
:func:`run_training`, which reads top to bottom: :func:`restore` (or start fresh), then for each
optimizer step :func:`train_step`, :func:`log_and_evaluate` and, when due, :func:`save`, then
:func:`finish` (summary.json and plots). What survives an interruption is :class:`LoopState`,
saved and restored in one place.

The task owns the data and the objective::

    class MyTask:
        def batch(self, step: int):             # this process's share of optimizer step `step`
            ...                                 # a pure function of step (and rank): no iterator
                                                # state, so --resume replays the exact batches
        def forward(self, model, batch) -> StepOutput:
            logits = model(**batch.inputs).logits
            loss_sum = F.cross_entropy(logits, batch.labels, reduction="sum")
            return StepOutput(loss_sum, count=len(batch.labels), tokens=batch.inputs["input_ids"].numel(),
                              sums={"correct": (logits.argmax(-1) == batch.labels).sum().item()})
        def split(self, batch, parts) -> list:          # for gradient accumulation (parts > 1)
        def evaluate(self, model) -> dict[str, float]:  # optional; under no_grad, eval mode
        def data_position(self, step) -> dict:          # optional; stored in checkpoint manifests

``StepOutput.loss_sum`` is a *sum* over the examples (or tokens) of one micro-batch and ``count``
the number of terms. The gradients of all micro-batches of all processes are added up and divided
once by the global count, so an optimizer step's gradient is the mean over the global batch
whatever the split into processes and micro-batches (and equals a one-process, one-pass run's).
``sums`` are reported per logged window as ``train_<name> = sum / count``.

A non-finite training loss (nan/inf) stops the run with :class:`TrainingError` naming the step,
before the optimizer sees it (``on_nonfinite="stop"``), or skips that update
(``on_nonfinite="skip"``; ``max_consecutive_nonfinite`` in a row still stop). Optimizers that skip
non-finite *gradients* themselves (BertAdam, Lamb) and fp16 steps whose scaled gradients
overflowed are counted in ``skipped_steps``. The checkpoint stores the RNG states of every rank,
so a resumed run continues with the same dropout masks and its loss curve equals the
uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from bertopt.train import checkpoint as ckpt
from bertopt.train.config import NONFINITE_POLICIES
from bertopt.train.distributed import DistContext, gradient_sync
from bertopt.train.precision import MixedPrecision
from bertopt.train.report import MetricsLog, plot_metrics, read_metrics, write_summary


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, checkpoint not writable, ...). The message says
    what happened at which step and what to do; the last good checkpoint is intact."""


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # differentiable sum of the per-example/per-token losses of a micro-batch
    count: int | float | torch.Tensor  # number of terms in loss_sum
    tokens: int = 0  # input tokens processed (for tokens/s)
    sums: dict[str, float] = field(default_factory=dict)  # reported as train_<name> = sum / count


@runtime_checkable
class TrainingTask(Protocol):
    def batch(self, step: int) -> Any: ...

    def forward(self, model: torch.nn.Module, batch: Any) -> StepOutput: ...


@dataclass
class LoopConfig:
    out_dir: str | Path
    total_steps: int
    log_every: int = 10  # one metrics.jsonl record per this many steps (losses averaged over them)
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end (and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 keeps all
    resume: str | Path | None = None  # None: fresh; "auto": newest in <out>/checkpoints; or a path
    progress: bool = True
    title: str = ""  # progress-bar label and plot title
    run_info: dict[str, Any] = field(default_factory=dict)  # saved in checkpoints and summary.json
    # keys of run_info that must be equal in a checkpoint to resume from it (model, batch, ...)
    resume_must_match: tuple[str, ...] = ()
    # which evaluate() keys loss.png draws next to the training loss (left and right axis)
    plot_eval_loss: str = "eval_loss"
    plot_eval_metric: str | None = "eval_accuracy"
    plots: bool = True  # draw loss.png / lr.png at the end
    # evaluate before the first step of a fresh run: a record {"step": 0, <evaluate() keys>} (no
    # training loss yet) starts metrics.jsonl, and summary.json gets "<key>_at_start"
    eval_at_start: bool = False
    on_nonfinite: str = "stop"  # a non-finite training loss: "stop" (TrainingError) or "skip" the update
    max_consecutive_nonfinite: int = 10  # with "skip": this many bad steps in a row stop the run
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the task's split())
    precision: str = "fp32"  # autocast of forward/backward: fp32 | bf16 | fp16 (see precision.py)

    def validate(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total_steps}")
        for name in ("log_every", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every == 0:
            raise ValueError("log_every must be >= 1")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got {self.on_nonfinite!r}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclass
class LoopResult:
    step: int  # optimizer steps completed
    stopped_by: str | None  # "SIGINT" / "SIGTERM" if a signal ended the run early, else None
    resumed_from: int | None
    summary: dict[str, Any]
    checkpoint: Path | None  # manifest of the last checkpoint written
    plots: list[Path]


@dataclass
class Window:
    """Running sums over the steps since the last metrics record."""

    loss_sum: float = 0.0
    count: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopState:
    """Everything about the run so far that a checkpoint must carry (``state_dict``), plus what
    this process knows of it (checkpoint written, last evaluation, why it stopped)."""

    step: int = 0
    train_time: float = 0.0
    window: Window = field(default_factory=Window)
    nonfinite_total: int = 0  # non-finite losses skipped (on_nonfinite="skip")
    nonfinite_in_a_row: int = 0
    overflow_steps: int = 0  # fp16 steps whose scaled gradients overflowed (GradScaler skipped them)
    resumed_from: int | None = None
    last_checkpoint: Path | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    stopped_by: str | None = None
    window_start: float = field(default_factory=time.perf_counter)
    first_step_s: float | None = None  # this process's first step (with --compile: includes compiling)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "window": vars(self.window).copy(), "train_time_s": self.train_time,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "overflow_steps": self.overflow_steps}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> "LoopState":
        return cls(step=int(saved["step"]), resumed_from=int(saved["step"]),
                   window=Window(**saved.get("window", {})), train_time=float(saved.get("train_time_s", 0.0)),
                   nonfinite_total=int(saved.get("nonfinite_total", 0)),
                   nonfinite_in_a_row=int(saved.get("nonfinite_in_a_row", 0)),
                   overflow_steps=int(saved.get("overflow_steps", 0)))

    def skipped_steps(self, optimizer) -> int | None:
        """Steps whose update was not applied for non-finite gradients: the optimizer's own count
        plus fp16 overflows; None for optimizers that do not count (fp32/bf16)."""
        own = getattr(optimizer, "skipped_steps", None)
        if own is None and not self.overflow_steps:
            return None
        return int(own or 0) + self.overflow_steps


@dataclass
class Training:
    """What one run trains, and with what: passed to every step of the loop."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    task: TrainingTask
    config: LoopConfig
    ctx: DistContext
    amp: MixedPrecision

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.out_dir) / "checkpoints"


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


def run_training(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, task: TrainingTask,
                 config: LoopConfig, ctx: DistContext | None = None,
                 finish: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
                 amp: MixedPrecision | None = None) -> LoopResult:
    """Train ``model`` for ``config.total_steps`` optimizer steps; see the module docstring.

    ``finish(model)``, if given, runs on every rank after the last step (eval mode, no_grad) unless
    a signal stopped the run; the fields it returns are added to ``summary.json`` (e.g. test
    accuracy). ``amp`` defaults to ``config.precision`` on the context's device.
    """
    config.validate()
    ctx = ctx or DistContext()
    amp = amp or MixedPrecision.for_device(config.precision, ctx.device)
    run = Training(model, optimizer, scheduler, task, config, ctx, amp)
    if ctx.is_main:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    state = restore(run)
    metrics = MetricsLog(Path(config.out_dir) / "metrics.jsonl", resume_step=state.resumed_from, enabled=ctx.is_main)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.total_steps, initial=state.step, desc=config.title or "train", unit="step",
               disable=not (config.progress and ctx.is_main), dynamic_ncols=True, smoothing=0.1)
    model.train()  # from_pretrained() returns a model in eval mode
    try:
        if config.eval_at_start and state.resumed_from is None and hasattr(task, "evaluate"):
            metrics.append({"step": 0, "lr": _current_lr(optimizer), **evaluate(run)})
        with _StopRequests() as stop:
            while state.step < config.total_steps:
                stats = train_step(run, state, stop_requested=lambda: stop.signal_name is not None)
                state.first_step_s = state.first_step_s or stats["seconds"]
                log_and_evaluate(run, state, stats, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}",
                                tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):,.0f}", refresh=False)
                stopping = stats["stop_votes"] > 0
                if stopping or state.step == config.total_steps or (
                        config.save_every and state.step % config.save_every == 0):
                    state.last_checkpoint = save(run, state) or state.last_checkpoint
                if stopping:
                    state.stopped_by = stop.signal_name or "SIGTERM"  # another rank's signal: preemption
                    break
    except OSError as exc:  # e.g. metrics.jsonl on a full disk (checkpoint writes raise TrainingError)
        raise TrainingError(
            f"after step {state.step}: {exc}. {_intact(state.last_checkpoint, run.checkpoint_dir, sentence_start=True)}; "
            "fix that (free disk space, check permissions), then run the same command again with --resume"
        ) from exc
    finally:
        bar.close()
        metrics.close()
    return finish_run(run, state, finish, wall_start)


def restore(run: Training) -> LoopState:
    """The state to start from: a fresh one, or the checkpoint ``config.resume`` names, loaded into
    the model, optimizer, scheduler, loss scaler and RNGs (CheckpointError if it does not fit)."""
    config, ctx = run.config, run.ctx
    if config.resume is None:
        return LoopState()
    path = Path(config.resume)
    if str(config.resume) == "auto":
        if not ckpt.list_checkpoints(run.checkpoint_dir):
            if ctx.is_main:
                print(f"--resume: no checkpoint in {run.checkpoint_dir} yet; starting from step 0", flush=True)
            return LoopState()
        path = run.checkpoint_dir
    try:
        loaded = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"cannot resume: {exc}. {ckpt.RESUME_ADVICE}") from exc
    ckpt.check_compatible(loaded.info.meta, config.run_info, config.resume_must_match, loaded.info.manifest_path)
    saved = loaded.state
    try:
        ckpt.set_training_state(run.model, run.optimizer, saved["model"], saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        if run.amp.scaler.is_enabled() and "scaler" in saved:
            run.amp.scaler.load_state_dict(saved["scaler"])
        ckpt.restore_rng_state(saved["rng"][ctx.rank % len(saved["rng"])])
        state = LoopState.from_state_dict(saved["loop"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ckpt.CheckpointError(
            f"{loaded.info.manifest_path}: the checkpoint verifies but does not fit this model and optimizer "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}); it belongs to a different "
            "model or program. Resume with the settings it was made with, or start a new run in another "
            "--out directory"
        ) from exc
    if "optimizer_skipped_steps" in saved["loop"] and hasattr(run.optimizer, "skipped_steps"):
        # torch's distributed state-dict helpers drop the optimizer's own extra fields
        run.optimizer.skipped_steps = int(saved["loop"]["optimizer_skipped_steps"])
    if ctx.is_main:
        for reason in loaded.skipped:
            print(f"warning: skipped a checkpoint that failed verification: {reason}", flush=True)
        print(f"resumed from {loaded.info.manifest_path} (step {state.step})", flush=True)
    return state


def train_step(run: Training, state: LoopState, *, stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """One optimizer step: K micro-batches forward and backward (gradients all-reduced on the last
    only), the gradient divided by the global count, then one clipped, non-finite-checked update."""
    model, optimizer, task, ctx, amp = run.model, run.optimizer, run.task, run.ctx, run.amp
    started = time.perf_counter()
    batch = task.batch(state.step)
    parts = task.split(batch, run.config.grad_accum_steps) if run.config.grad_accum_steps > 1 else [batch]
    local: dict[str, float] = {"count": 0.0, "loss_sum": 0.0, "tokens": 0.0}
    for i, part in enumerate(parts):
        with gradient_sync(model, enabled=i == len(parts) - 1), amp.autocast():
            out = task.forward(model, part)
        amp.scaler.scale(out.loss_sum).backward()
        for key, value in (("count", out.count), ("loss_sum", out.loss_sum.detach()), ("tokens", out.tokens),
                           *((f"sum_{k}", v) for k, v in sorted(out.sums.items()))):
            local[key] = local.get(key, 0.0) + _as_float(value)
    local["stop_votes"] = float(stop_requested())  # a signal on any rank stops every rank after this step
    keys = list(local)
    totals = dict(zip(keys, ctx.all_reduce_sum(torch.tensor([local[k] for k in keys], dtype=torch.float64)).tolist()))
    count = totals["count"]
    if count <= 0:
        raise TrainingError(f"step {state.step + 1}: the batch has no loss terms (count 0)")
    loss, lr = totals["loss_sum"] / count, _current_lr(optimizer)
    grad_norm = float("nan")
    if math.isfinite(loss):
        state.nonfinite_in_a_row = 0
        # gradients hold sum over this rank (DDP/FSDP average over ranks): make them the global mean
        _scale_gradients(model, ctx.world_size / count)
        own_norm = getattr(optimizer, "last_grad_norm", None) is None
        grad_norm = _grad_norm(model) if own_norm else None
        scale_before = amp.scaler.get_scale() if amp.scaler.is_enabled() else None
        amp.scaler.step(optimizer)
        amp.scaler.update()
        if scale_before is not None and amp.scaler.get_scale() < scale_before:
            state.overflow_steps += 1  # GradScaler found inf/nan and skipped the update
        if grad_norm is None:
            grad_norm = _as_float(optimizer.last_grad_norm)
    else:  # the update is never applied: parameters and moments stay as they were
        state.nonfinite_total += 1
        state.nonfinite_in_a_row += 1
        _on_nonfinite_loss(loss, state.step + 1, run, state)
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    seconds = time.perf_counter() - started
    state.train_time += seconds
    if math.isfinite(loss):  # a skipped step adds nothing to the logged averages
        state.window.loss_sum += totals["loss_sum"]
        state.window.count += count
        state.window.tokens += totals["tokens"]
        for key in keys:
            if key.startswith("sum_"):
                state.window.sums[key[4:]] = state.window.sums.get(key[4:], 0.0) + totals[key]
    state.window.steps += 1
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": totals["tokens"], "seconds": seconds,
            "stop_votes": totals["stop_votes"]}


def log_and_evaluate(run: Training, state: LoopState, stats: dict[str, Any], metrics: MetricsLog) -> None:
    """A metrics.jsonl record every ``log_every`` steps (and at evaluations and the end), with the
    window's averages; evaluation every ``eval_every`` steps and at the end. A signal forces no
    record: the window goes into the checkpoint, so a resumed run logs what an uninterrupted would."""
    config, step = run.config, state.step
    is_last = step == config.total_steps
    evaluating = hasattr(run.task, "evaluate") and (is_last or (config.eval_every and step % config.eval_every == 0))
    if not (is_last or evaluating or step % config.log_every == 0):
        return
    window, elapsed = state.window, time.perf_counter() - state.window_start
    averaged = window.count > 0  # else every step of the window was skipped
    record = {"step": step, "loss": window.loss_sum / window.count if averaged else float("nan"),
              "lr": stats["lr"], "grad_norm": stats["grad_norm"],
              "tokens_per_s": window.tokens / elapsed if elapsed > 0 else float("nan"),
              "train_time_s": state.train_time}
    for name, value in window.sums.items():
        record[f"train_{name}"] = value / window.count if averaged else float("nan")
    skipped = state.skipped_steps(run.optimizer)
    if skipped is not None:
        record["skipped_steps"] = skipped
    if config.on_nonfinite == "skip":
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


def save(run: Training, state: LoopState) -> Path | None:
    """An atomic checkpoint of the step just finished (collective: every rank calls it)."""
    model_state, optim_state = ckpt.get_training_state(run.model, run.optimizer)
    rng_states = run.ctx.all_gather_object(ckpt.capture_rng_state())
    path = None
    if run.ctx.is_main:
        loop = state.state_dict() | {"world_size": run.ctx.world_size}
        if hasattr(run.optimizer, "skipped_steps"):
            loop["optimizer_skipped_steps"] = int(run.optimizer.skipped_steps)
        payload = {"model": model_state, "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
                   "rng": rng_states, "loop": loop}
        if run.amp.scaler.is_enabled():
            payload["scaler"] = run.amp.scaler.state_dict()
        meta = {"run": run.config.run_info, "world_size": run.ctx.world_size}
        if hasattr(run.task, "data_position"):
            meta["data_position"] = run.task.data_position(state.step)
        try:
            path = ckpt.save_checkpoint(run.checkpoint_dir, state.step, payload, meta=meta,
                                        keep=run.config.keep_checkpoints).manifest_path
        except OSError as exc:
            previous = ckpt.latest_checkpoint(run.checkpoint_dir)
            kept = f"The checkpoint of step {previous.step} is intact" if previous else "No earlier checkpoint exists"
            raise TrainingError(
                f"could not write the checkpoint of step {state.step} to {run.checkpoint_dir}: {exc}. "
                f"{kept}; free disk space or choose another --out, then run again with --resume"
            ) from exc
    run.ctx.barrier()
    return path


_TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "train_time_s")


def finish_run(run: Training, state: LoopState, finish: Callable | None, wall_start: float) -> LoopResult:
    """``finish(model)`` fields (unless a signal stopped the run), then summary.json and the plots."""
    config, out_dir = run.config, Path(run.config.out_dir)
    final_fields = evaluate(run, finish) if finish is not None and state.stopped_by is None else {}
    summary: dict[str, Any] = {}
    plots: list[Path] = []
    if run.ctx.is_main:
        records = read_metrics(out_dir / "metrics.jsonl")
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        at_start = next((r for r in records if r.get("step") == 0), {})
        last_eval = state.last_eval
        if not last_eval and hasattr(run.task, "evaluate"):  # e.g. resumed a finished run: report its last eval
            evaluated = [r for r in records if any(k not in _TRAIN_KEYS and k.startswith(("eval", "dev")) for k in r)]
            if evaluated:
                last_eval = {k: v for k, v in evaluated[-1].items() if k.startswith(("eval", "dev"))}
        summary = {
            "title": config.title, "steps_completed": state.step, "total_steps": config.total_steps,
            "stopped_by": state.stopped_by, "resumed_from": state.resumed_from,
            "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
            **{f"{k}_at_start": v for k, v in at_start.items() if k not in ("step", "lr")},
            **last_eval, **final_fields,
            "train_time_s": round(state.train_time, 2),
            "first_step_s": round(state.first_step_s, 3) if state.first_step_s else None,
            "wall_time_s_this_process": round(time.perf_counter() - wall_start, 2),
            "processes": run.ctx.world_size,
            "checkpoint": str(state.last_checkpoint) if state.last_checkpoint else None,
            "metrics": str(out_dir / "metrics.jsonl"), "run": config.run_info,
        }
        if config.plots:
            plots = plot_metrics(records, out_dir, title=config.title, eval_loss_key=config.plot_eval_loss,
                                 eval_metric_key=config.plot_eval_metric)
        summary["plots"] = [str(p) for p in plots]
        write_summary(out_dir / "summary.json", summary)
    return LoopResult(step=state.step, stopped_by=state.stopped_by, resumed_from=state.resumed_from,
                      summary=summary, checkpoint=state.last_checkpoint, plots=plots)


# --- helpers ----------------------------------------------------------------------------------


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _scale_gradients(model: torch.nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the gradients (DTensor-aware), for optimizers that do not report one."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _as_float(value) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def _intact(last_checkpoint: Path | None, checkpoint_dir: Path, *, sentence_start: bool = False) -> str:
    """'the last checkpoint (...) is intact' or 'no checkpoint was written yet'."""
    if last_checkpoint is None:
        latest = ckpt.latest_checkpoint(checkpoint_dir)
        last_checkpoint = latest.manifest_path if latest else None
    text = "no checkpoint was written yet" if last_checkpoint is None else \
        f"the last checkpoint ({last_checkpoint}) is intact"
    return text[0].upper() + text[1:] if sentence_start else text


def _on_nonfinite_loss(loss: float, step: int, run: Training, state: LoopState) -> None:
    """Stop (TrainingError naming the step) or, with on_nonfinite="skip", warn and carry on."""
    config, in_a_row = run.config, state.nonfinite_in_a_row
    intact = _intact(state.last_checkpoint, run.checkpoint_dir)
    advice = ("Lower --lr (or keep --max-grad-norm on), check the data, then resume from the checkpoint with "
              "--resume")
    if config.on_nonfinite == "stop":
        raise TrainingError(
            f"the training loss is {loss} at step {step}; this update was not applied and {intact}. "
            f"{advice} (or pass --on-nonfinite skip to skip such steps)"
        )
    if in_a_row >= config.max_consecutive_nonfinite:
        raise TrainingError(
            f"the training loss was non-finite at {in_a_row} steps in a row (steps {step - in_a_row + 1} to "
            f"{step}, last value {loss}); none of them was applied and {intact}. {advice}"
        )
    if run.ctx.is_main:
        print(f"warning: the training loss is {loss} at step {step}; skipped this update "
              f"({in_a_row} in a row, at most {config.max_consecutive_nonfinite - 1} allowed)", flush=True)
