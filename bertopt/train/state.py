"""What the training loop works with: :class:`Training`, the run's fixed parts (model, optimizer,
job, settings); :class:`LoopState`, what changes and what a checkpoint carries (with the logging
:class:`Window` and the skipped-update counts); and :class:`StepStats`, what one step reports.

Three things can keep an update from being applied, each counted once:

- a non-finite training *loss*: the loop never calls the optimizer (``LoopState.nonfinite_total``,
  with ``--on-nonfinite skip``; ``stop`` raises :class:`~bertopt.train.job.NonFiniteLoss`);
- fp16 gradients that overflowed at the current loss scale: GradScaler does not call the optimizer
  (``LoopState.overflow_steps``);
- non-finite *gradients* reaching BertAdam / Lamb, which skip the step themselves (the optimizer's
  own ``skipped_steps``, part of its state_dict).

``skipped_steps`` in metrics.jsonl is the last two together (:meth:`LoopState.skipped_steps`);
``nonfinite_loss_steps`` the first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bertopt.train.config import RunConfig
from bertopt.train.distributed import DistContext
from bertopt.train.job import Job, TrainingTask
from bertopt.train.precision import MixedPrecision
from bertopt.train.spike import SpikeState


@dataclass
class Window:
    """Running sums over the steps since the last metrics record."""

    loss_sum: float = 0.0
    count: float = 0.0
    tokens: float = 0.0
    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)


@dataclass
class StepStats:
    """What one optimizer step reports, summed over its micro-batches and processes."""

    loss_sum: float
    count: float
    tokens: float
    sums: dict[str, float]  # the task's StepOutput.sums, e.g. {"correct": 93.0}
    lr: float  # the learning rate this step used
    grad_norm: float  # global norm of the (unscaled, unclipped) mean gradient; nan when not stepped
    seconds: float
    stop_requested: bool  # a signal on some process: every process stops after this step

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count


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
    spike: SpikeState = field(default_factory=SpikeState)  # the spike detector and the skipped data steps

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "window": vars(self.window).copy(), "train_time_s": self.train_time,
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "overflow_steps": self.overflow_steps, "spike": self.spike.state_dict()}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> "LoopState":
        return cls(step=int(saved["step"]), resumed_from=int(saved["step"]),
                   window=Window(**saved.get("window", {})), train_time=float(saved.get("train_time_s", 0.0)),
                   nonfinite_total=int(saved.get("nonfinite_total", 0)),
                   nonfinite_in_a_row=int(saved.get("nonfinite_in_a_row", 0)),
                   overflow_steps=int(saved.get("overflow_steps", 0)),
                   spike=SpikeState.from_state_dict(saved.get("spike")))  # absent before --on-spike

    def add_to_window(self, stats: StepStats) -> None:
        """Count a finished step in the logging window (a skipped step adds no loss, only a step)."""
        if math.isfinite(stats.loss):
            self.window.loss_sum += stats.loss_sum
            self.window.count += stats.count
            self.window.tokens += stats.tokens
            for name, value in stats.sums.items():
                self.window.sums[name] = self.window.sums.get(name, 0.0) + value
        self.window.steps += 1

    def skipped_steps(self, optimizer) -> int | None:
        """Updates not applied for non-finite gradients: the optimizer's own count plus fp16
        overflows; None for optimizers that do not count (and no overflow so far)."""
        own = getattr(optimizer, "skipped_steps", None)
        if own is None and not self.overflow_steps:
            return None
        return int(own or 0) + self.overflow_steps


@dataclass
class Training:
    """What one run trains, and with what: passed to every step of the loop."""

    model: torch.nn.Module  # job.model, wrapped for DDP/FSDP2 and compiled as asked
    optimizer: torch.optim.Optimizer
    scheduler: Any
    job: Job
    config: RunConfig
    ctx: DistContext
    amp: MixedPrecision
    eval_every: int  # resolved once: Job.eval_every(config.eval_every)

    @property
    def task(self) -> TrainingTask:
        return self.job.task

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.out) / "checkpoints"
