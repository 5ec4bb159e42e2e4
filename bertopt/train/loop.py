"""The training loop shared by ``bertopt pretrain`` and ``bertopt finetune``.

A command builds a model, an optimizer, a scheduler and a :class:`TrainingTask`, then calls
:func:`run_training`. The loop owns everything that is the same for every job: the step order
(forward, backward, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad``), averaging over
ranks, the progress bar, ``metrics.jsonl``, periodic evaluation, atomic checkpoints, ``--resume``,
SIGINT/SIGTERM (save, then stop cleanly), and ``summary.json`` plus plots at the end.

The task owns the data and the objective::

    class MyTask:
        def batch(self, step: int):             # the batch of optimizer step `step` (0-based)
            ...                                 # a pure function of step (and rank): no iterator
                                                # state, so --resume replays the exact batches
        def forward(self, model, batch) -> StepOutput:
            logits = model(**batch.inputs).logits
            loss_sum = F.cross_entropy(logits, batch.labels, reduction="sum")
            return StepOutput(loss_sum, count=len(batch.labels), tokens=batch.inputs["input_ids"].numel(),
                              sums={"correct": (logits.argmax(-1) == batch.labels).sum().item()})
        def evaluate(self, model) -> dict[str, float]:   # optional; called under no_grad, eval mode
            return {"eval_loss": ..., "eval_accuracy": ...}  # keys go into metrics.jsonl as they are
        def data_position(self, step) -> dict:          # optional; stored in checkpoint manifests
            return {"epoch": ..., "index": ...}

``StepOutput.loss_sum`` is a *sum* over this rank's examples (or tokens) and ``count`` the number
of terms; the loop divides by the count summed over all ranks, so the gradient is the mean over
the global batch whatever the split across processes (and equals a one-process run's). ``sums``
are reported per logged window as ``train_<name> = sum / count`` (e.g. ``train_correct`` is the
training accuracy).

:class:`EpochBatchSampler` turns "step" into example indices (a fresh shuffle per epoch, the
global batch split across ranks), for tasks with a fixed list of examples.

A non-finite training loss (nan/inf) stops the run with :class:`TrainingError` naming the step,
before the optimizer sees it (``on_nonfinite="stop"``, the default), or skips that update and goes
on (``on_nonfinite="skip"``; ``max_consecutive_nonfinite`` skips in a row still stop the run).
Either way no parameter or moment is touched by the bad step, and the last checkpoint is intact.
Optimizers that skip non-finite *gradients* themselves (BertAdam, Lamb) have their running count
logged as ``skipped_steps`` and carried through checkpoints.

Batches, the model and the RNG are the only sources of randomness the loop knows about: the
checkpoint stores the torch/numpy/python RNG states of every rank, so a resumed run continues
with the same dropout masks and its loss curve equals the uninterrupted one.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from bertopt.train import checkpoint as ckpt
from bertopt.train.distributed import DistContext
from bertopt.train.optim_args import NONFINITE_POLICIES
from bertopt.train.report import MetricsLog, plot_metrics, read_metrics, write_summary


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, checkpoint not writable, ...). The message says
    what happened at which step and what to do; the last good checkpoint is intact."""


@dataclass
class StepOutput:
    loss_sum: torch.Tensor  # differentiable sum of the per-example/per-token losses on this rank
    count: int | float | torch.Tensor  # number of terms in loss_sum on this rank
    tokens: int = 0  # input tokens processed on this rank (for tokens/s)
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
    # a non-finite training loss: "stop" (TrainingError naming the step) or "skip" the update
    on_nonfinite: str = "stop"
    max_consecutive_nonfinite: int = 10  # with "skip": this many bad steps in a row stop the run

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


@dataclass
class LoopResult:
    step: int  # optimizer steps completed
    stopped_by: str | None  # "SIGINT" / "SIGTERM" if a signal ended the run early, else None
    resumed_from: int | None
    summary: dict[str, Any]
    checkpoint: Path | None  # manifest of the last checkpoint written
    plots: list[Path]


# --- data order -----------------------------------------------------------------------------


class EpochBatchSampler:
    """Example indices for each step: epoch e visits a permutation seeded by (seed, e) in slices of
    ``global_batch_size`` (the last incomplete slice is dropped); rank r takes its contiguous share.

    A pure function of the step, so resuming needs no sampler state.
    """

    def __init__(self, num_examples: int, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if global_batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {global_batch_size}")
        if global_batch_size % world_size:
            raise ValueError(
                f"batch size {global_batch_size} must be divisible by the number of processes {world_size}"
            )
        if num_examples < global_batch_size:
            raise ValueError(
                f"only {num_examples} training examples, fewer than one batch of {global_batch_size}; "
                "use a smaller --batch-size or a bigger corpus"
            )
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = num_examples // global_batch_size
        self._cached_epoch: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                order = np.arange(self.num_examples)
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1]

    def position(self, step: int) -> dict[str, int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": index, "example_offset": index * self.global_batch_size}

    def global_indices(self, step: int) -> np.ndarray:
        """All ranks' indices for ``step``, in rank order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.global_batch_size
        return self._order(epoch)[start:start + self.global_batch_size]

    def indices(self, step: int) -> np.ndarray:
        """This rank's indices for ``step``."""
        share = self.global_batch_size // self.world_size
        return self.global_indices(step)[self.rank * share:(self.rank + 1) * share]


# --- RNG and state dicts ----------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global) and torch RNG states as plain values and tensors (weights_only-safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (str(name), keys.tolist(), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter names.

    Works for plain modules, DDP and FSDP2 alike (collective under FSDP2: call on every rank;
    ranks other than 0 may receive empty dicts), so a checkpoint saved by N processes can be
    resumed by M processes, or by one.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def get_model_state(model: torch.nn.Module) -> dict:
    """Full (unsharded, CPU) model state dict keyed by parameter names; see :func:`get_training_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                       model_state: dict, optimizer_state: dict | None) -> None:
    """Load state dicts from :func:`get_training_state` into a (possibly wrapped) model/optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, model_state, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=options)


# --- signals ----------------------------------------------------------------------------------


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


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


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


_TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "train_time_s")


class _Window:
    """Running sums over the steps since the last metrics record (saved in checkpoints)."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.loss_sum = float(state.get("loss_sum", 0.0))
        self.count = float(state.get("count", 0.0))
        self.tokens = float(state.get("tokens", 0.0))
        self.steps = int(state.get("steps", 0))
        self.sums: dict[str, float] = dict(state.get("sums", {}))

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "count": self.count, "tokens": self.tokens, "steps": self.steps,
                "sums": dict(self.sums)}


def _resolve_resume(config: LoopConfig, checkpoint_dir: Path) -> Path | None:
    if config.resume is None:
        return None
    if str(config.resume) == "auto":
        return checkpoint_dir if ckpt.list_checkpoints(checkpoint_dir) else None
    return Path(config.resume)


def _describe_difference(saved: dict, current: dict) -> str:
    """``hidden_size: 64 in the checkpoint, 128 in this run`` for the fields that differ."""
    keys = sorted(set(saved) | set(current), key=str)
    diffs = [f"{k}: {saved.get(k, '(absent)')!r} in the checkpoint, {current.get(k, '(absent)')!r} in this run"
             for k in keys if saved.get(k, "(absent)") != current.get(k, "(absent)")]
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _check_compatible(meta: dict, config: LoopConfig, where: Path) -> None:
    """CheckpointError unless the checkpoint was made by the same command with the same settings
    (``config.resume_must_match``). A setting the checkpoint does not record at all means it was
    written by another command or program: refused too, unless this run leaves it unset (None)."""
    saved = meta.get("run", {})
    advice = "resume with the same settings, or start a new run in another --out directory"
    for key in ("command", *config.resume_must_match):
        if key not in config.run_info:
            continue
        current = config.run_info[key]
        if key not in saved:
            if current is None:
                continue
            raise ckpt.CheckpointError(
                f"{where}: the checkpoint does not record {key} (this run has {key}={current!r}), so it was "
                f"written by another command or program and cannot be continued here; {advice}"
            )
        if saved[key] != current:
            if isinstance(saved[key], dict) and isinstance(current, dict):
                difference = f"a different {key} ({_describe_difference(saved[key], current)})"
            else:
                difference = f"{key}={saved[key]!r} but this run has {key}={current!r}"
            raise ckpt.CheckpointError(f"{where}: the checkpoint was made with {difference}; {advice}")


_RESUME_ADVICE = ("--resume takes a checkpoints directory (the newest checkpoint that verifies is used), a "
                  "step-*.json manifest or the step-*.pt payload a manifest names; --resume alone uses "
                  "<out>/checkpoints. To start from scratch instead, leave --resume out")


def _intact(last_checkpoint: Path | None, checkpoint_dir: Path, *, sentence_start: bool = False) -> str:
    """'the last checkpoint (...) is intact' or 'no checkpoint was written yet'."""
    if last_checkpoint is None:
        latest = ckpt.latest_checkpoint(checkpoint_dir)
        last_checkpoint = latest.manifest_path if latest else None
    text = "no checkpoint was written yet" if last_checkpoint is None else \
        f"the last checkpoint ({last_checkpoint}) is intact"
    return text[0].upper() + text[1:] if sentence_start else text


def _on_nonfinite_loss(loss: float, step: int, config: LoopConfig, in_a_row: int, last_checkpoint: Path | None,
                       checkpoint_dir: Path, ctx: DistContext) -> None:
    """Stop (TrainingError naming the step) or, with on_nonfinite="skip", warn and carry on."""
    advice = ("Lower --lr (or keep --max-grad-norm on), check the data, then resume from the checkpoint with "
              "--resume")
    if config.on_nonfinite == "stop":
        raise TrainingError(
            f"the training loss is {loss} at step {step}; this update was not applied and "
            f"{_intact(last_checkpoint, checkpoint_dir)}. {advice} (or pass --on-nonfinite skip to skip such steps)"
        )
    if in_a_row >= config.max_consecutive_nonfinite:
        raise TrainingError(
            f"the training loss was non-finite at {in_a_row} steps in a row (steps {step - in_a_row + 1} to "
            f"{step}, last value {loss}); none of them was applied and {_intact(last_checkpoint, checkpoint_dir)}. "
            f"{advice}"
        )
    if ctx.is_main:
        print(f"warning: the training loss is {loss} at step {step}; skipped this update "
              f"({in_a_row} in a row, at most {config.max_consecutive_nonfinite - 1} allowed)", flush=True)


def run_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    task: TrainingTask,
    config: LoopConfig,
    ctx: DistContext | None = None,
    finish: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
) -> LoopResult:
    """Train ``model`` for ``config.total_steps`` optimizer steps; see the module docstring.

    ``finish(model)``, if given, runs on every rank after the last step (eval mode, no_grad) unless
    a signal stopped the run; the fields it returns are added to ``summary.json`` (e.g. test
    accuracy). Fields can also be added later: update ``result.summary`` and call
    :func:`bertopt.train.report.write_summary`.
    """
    config.validate()
    ctx = ctx or DistContext()
    out_dir = Path(config.out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()

    # --- resume -------------------------------------------------------------------------------
    start_step, resumed_from, train_time = 0, None, 0.0
    window = _Window()
    resume_path = _resolve_resume(config, checkpoint_dir)
    if config.resume is not None and resume_path is None and ctx.is_main:
        print(f"--resume: no checkpoint in {checkpoint_dir} yet; starting from step 0", flush=True)
    nonfinite_total = nonfinite_in_a_row = 0
    if resume_path is not None:
        try:
            loaded = ckpt.load_checkpoint(resume_path)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"cannot resume: {exc}. {_RESUME_ADVICE}") from exc
        _check_compatible(loaded.info.meta, config, loaded.info.manifest_path)
        state = loaded.state
        try:
            set_training_state(model, optimizer, state["model"], state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            rng_states = state["rng"]
            restore_rng_state(rng_states[ctx.rank % len(rng_states)])
            loop_state = state["loop"]
            start_step = resumed_from = int(loop_state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ckpt.CheckpointError(
                f"{loaded.info.manifest_path}: the checkpoint verifies but does not fit this model and optimizer "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}); it belongs to a different "
                "model or program. Resume with the settings it was made with, or start a new run in another "
                "--out directory"
            ) from exc
        window = _Window(loop_state.get("window"))
        train_time = float(loop_state.get("train_time_s", 0.0))
        if "optimizer_skipped_steps" in loop_state and hasattr(optimizer, "skipped_steps"):
            # torch's distributed state-dict helpers drop the optimizer's own extra fields
            optimizer.skipped_steps = int(loop_state["optimizer_skipped_steps"])
        nonfinite_total = int(loop_state.get("nonfinite_total", 0))
        nonfinite_in_a_row = int(loop_state.get("nonfinite_in_a_row", 0))
        if ctx.is_main:
            for reason in loaded.skipped:
                print(f"warning: skipped a checkpoint that failed verification: {reason}", flush=True)
            print(f"resumed from {loaded.info.manifest_path} (step {start_step})", flush=True)

    metrics = MetricsLog(out_dir / "metrics.jsonl", resume_step=resumed_from, enabled=ctx.is_main)
    last_checkpoint: Path | None = None
    if config.eval_at_start and resumed_from is None and hasattr(task, "evaluate"):
        model.eval()
        with torch.no_grad():
            start_eval = {k: float(v) for k, v in task.evaluate(model).items()}
        model.train()
        metrics.append({"step": 0, "lr": _current_lr(optimizer), **start_eval})

    def save(step: int) -> Path | None:
        model_state, optim_state = get_training_state(model, optimizer)
        rng_states = ctx.all_gather_object(capture_rng_state())
        path = None
        if ctx.is_main:
            state = {
                "model": model_state,
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_states,
                "loop": {"step": step, "window": window.state_dict(), "train_time_s": train_time,
                         "world_size": ctx.world_size, "nonfinite_total": nonfinite_total,
                         "nonfinite_in_a_row": nonfinite_in_a_row},
            }
            if hasattr(optimizer, "skipped_steps"):
                state["loop"]["optimizer_skipped_steps"] = int(optimizer.skipped_steps)
            meta = {"run": config.run_info, "world_size": ctx.world_size}
            if hasattr(task, "data_position"):
                meta["data_position"] = task.data_position(step)
            try:
                path = ckpt.save_checkpoint(checkpoint_dir, step, state, meta=meta,
                                            keep=config.keep_checkpoints).manifest_path
            except OSError as exc:
                previous = ckpt.latest_checkpoint(checkpoint_dir)
                kept = f"The checkpoint of step {previous.step} is intact" if previous else "No earlier checkpoint exists"
                raise TrainingError(
                    f"could not write the checkpoint of step {step} to {checkpoint_dir}: {exc}. "
                    f"{kept}; free disk space or choose another --out, then run again with --resume"
                ) from exc
        ctx.barrier()
        return path

    from tqdm.auto import tqdm

    bar = tqdm(total=config.total_steps, initial=start_step, desc=config.title or "train", unit="step",
               disable=not (config.progress and ctx.is_main), dynamic_ncols=True, smoothing=0.1)
    stopped_by = None
    step = start_step
    last_eval: dict[str, float] = {}
    window_start = time.perf_counter()
    tokens_per_s = float("nan")
    bar_rate = None  # smoothed tokens/s for the progress bar
    model.train()
    try:
        with _StopRequests() as stop:
            while step < config.total_steps:
                step_start = time.perf_counter()
                batch = task.batch(step)
                out = task.forward(model, batch)
                # the normaliser is the global count, so the gradient is the global-batch mean;
                # DDP/FSDP average gradients over ranks, hence the factor world_size
                count = _as_float(ctx.all_reduce_sum(torch.tensor([_as_float(out.count)], dtype=torch.float64))[0])
                if count <= 0:
                    raise TrainingError(f"step {step + 1}: the batch has no loss terms (count 0)")
                (out.loss_sum * (ctx.world_size / count)).backward()

                sum_names = sorted(out.sums)
                local = [_as_float(out.loss_sum.detach()), float(out.tokens), 1.0 if stop.signal_name else 0.0]
                local += [_as_float(out.sums[k]) for k in sum_names]
                reduced = ctx.all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
                loss_sum, tokens, stop_votes = reduced[:3]
                loss = loss_sum / count
                lr = _current_lr(optimizer)
                finite = math.isfinite(loss)
                if finite:
                    nonfinite_in_a_row = 0
                    own_norm = getattr(optimizer, "last_grad_norm", None) is None
                    grad_norm = _grad_norm(model) if own_norm else None
                    optimizer.step()
                else:  # the update is never applied: parameters and moments stay as they were
                    nonfinite_total += 1
                    nonfinite_in_a_row += 1
                    _on_nonfinite_loss(loss, step + 1, config, nonfinite_in_a_row, last_checkpoint,
                                       checkpoint_dir, ctx)
                    grad_norm = float("nan")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if grad_norm is None:
                    grad_norm = _as_float(optimizer.last_grad_norm)
                step += 1
                step_seconds = time.perf_counter() - step_start
                train_time += step_seconds

                if finite:  # a skipped step adds nothing to the logged averages
                    window.loss_sum += loss_sum
                    window.count += count
                    window.tokens += tokens
                    for name, value in zip(sum_names, reduced[3:]):
                        window.sums[name] = window.sums.get(name, 0.0) + value
                window.steps += 1

                stopping = stop_votes > 0
                stop_name = stop.signal_name or ("SIGTERM" if stopping else None)
                is_last = step == config.total_steps
                evaluate = hasattr(task, "evaluate") and (
                    is_last or (config.eval_every and step % config.eval_every == 0))
                # a signal does not force a record: the window goes into the checkpoint instead, so
                # the resumed run logs exactly what the uninterrupted one would have
                if is_last or evaluate or step % config.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window.tokens / elapsed if elapsed > 0 else float("nan")
                    averaged = window.count > 0  # else every step of the window was skipped
                    record = {
                        "step": step,
                        "loss": window.loss_sum / window.count if averaged else float("nan"),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "train_time_s": train_time,
                    }
                    for name, value in window.sums.items():
                        record[f"train_{name}"] = value / window.count if averaged else float("nan")
                    if hasattr(optimizer, "skipped_steps"):  # steps the optimizer skipped (non-finite gradients)
                        record["skipped_steps"] = int(optimizer.skipped_steps)
                    if config.on_nonfinite == "skip":
                        record["nonfinite_loss_steps"] = nonfinite_total
                    if evaluate:
                        model.eval()
                        with torch.no_grad():
                            last_eval = {k: float(v) for k, v in task.evaluate(model).items()}
                        model.train()
                        record.update(last_eval)
                    metrics.append(record)
                    window = _Window()
                    window_start = time.perf_counter()
                step_rate = tokens / max(step_seconds, 1e-9)
                bar_rate = step_rate if bar_rate is None else 0.9 * bar_rate + 0.1 * step_rate
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{bar_rate:,.0f}", refresh=False)

                if is_last or stopping or (config.save_every and step % config.save_every == 0):
                    last_checkpoint = save(step) or last_checkpoint
                if stopping:
                    stopped_by = stop_name
                    break
    except OSError as exc:  # e.g. metrics.jsonl on a full disk (checkpoint writes raise TrainingError)
        kept = _intact(last_checkpoint, checkpoint_dir, sentence_start=True)
        raise TrainingError(
            f"after step {step}: {exc}. {kept}; fix that (free disk space, check permissions), then run the "
            "same command again with --resume"
        ) from exc
    finally:
        bar.close()
        metrics.close()

    final_fields: dict[str, Any] = {}
    if finish is not None and stopped_by is None:
        model.eval()
        with torch.no_grad():
            final_fields = dict(finish(model))
        model.train()
    summary: dict[str, Any] = {}
    plots: list[Path] = []
    if ctx.is_main:
        records = read_metrics(out_dir / "metrics.jsonl")
        losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
        at_start = next((r for r in records if r.get("step") == 0), {})
        start_fields = {f"{k}_at_start": v for k, v in at_start.items() if k not in ("step", "lr")}
        if not last_eval and hasattr(task, "evaluate"):  # e.g. resumed a finished run: report its last eval
            evaluated = [r for r in records if any(k not in _TRAIN_KEYS and k.startswith(("eval", "dev")) for k in r)]
            if evaluated:
                last_eval = {k: v for k, v in evaluated[-1].items() if k.startswith(("eval", "dev"))}
        summary = {
            "title": config.title,
            "steps_completed": step,
            "total_steps": config.total_steps,
            "stopped_by": stopped_by,
            "resumed_from": resumed_from,
            "first_logged_loss": losses[0] if losses else None,
            "last_logged_loss": losses[-1] if losses else None,
            **start_fields,
            **last_eval,
            **final_fields,
            "train_time_s": round(train_time, 2),
            "wall_time_s_this_process": round(time.perf_counter() - wall_start, 2),
            "processes": ctx.world_size,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
            "metrics": str(out_dir / "metrics.jsonl"),
            "run": config.run_info,
        }
        if config.plots:
            plots = plot_metrics(records, out_dir, title=config.title, eval_loss_key=config.plot_eval_loss,
                                 eval_metric_key=config.plot_eval_metric)
        summary["plots"] = [str(p) for p in plots]
        write_summary(out_dir / "summary.json", summary)
    return LoopResult(step=step, stopped_by=stopped_by, resumed_from=resumed_from, summary=summary,
                      checkpoint=last_checkpoint, plots=plots)
