"""What a training command hands the loop: a :class:`Job` (model, task, length, run info, export)
and the task's contract (:class:`TrainingTask`, :class:`StepOutput`); and the errors that stop
training (:class:`TrainingError`, :class:`NonFiniteLoss`, :class:`LossSpike`).

A command (``pretrain.build_job``, ``finetune.build_job``) turns its typed config into a Job; the
skeleton (:mod:`bertopt.train.command`) runs it with the config's :class:`~bertopt.train.config.RunConfig`
through :func:`bertopt.train.loop.run_training`. The task owns the data and the objective::

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, checkpoint not writable, ...). The message says
    what happened at which step and what to do; the last good checkpoint is intact."""


class NonFiniteLoss(TrainingError):
    """The training loss was nan/inf (once with ``--on-nonfinite stop``, or too many steps in a row
    with ``skip``): the run diverged. The study records such a run as a result, not a failure."""


class LossSpike(TrainingError):
    """A finite loss spike that ``--on-spike rewind`` could not get past: ``--max-rewinds`` rewinds
    were made already, or no checkpoint from before the spike is left."""


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
class Job:
    """What a training command supplies to the skeleton and the loop, beside its RunConfig: the
    settings the loop needs that the command decides (length, names, what a checkpoint must match,
    how to evaluate, plot and export)."""

    model: Any  # the torch module to train (unwrapped)
    task: Any  # a TrainingTask
    total_steps: int
    title: str = ""  # progress-bar label and plot title
    run_info: dict[str, Any] = field(default_factory=dict)  # into checkpoints and summary.json
    resume_must_match: tuple[str, ...] = ()  # run_info keys a checkpoint must share to be resumed
    export: Callable[[dict, Path], None] | None = None  # write the trained model (full state dict) as a directory
    shard_modules: Any = ()  # blocks FSDP2 shards separately
    finish: Callable | None = None  # extra evaluation after the last step (fields for summary.json)
    # which evaluate() keys loss.png draws next to the training loss (left and right axis)
    plot_eval_loss: str = "eval_loss"
    plot_eval_metric: str | None = "eval_accuracy"
    plots: bool = True  # draw loss.png / lr.png at the end
    # evaluate before the first step of a fresh run: a record {"step": 0, <evaluate() keys>} (no
    # training loss yet) starts metrics.jsonl, and summary.json gets "<key>_at_start"
    eval_at_start: bool = True
    summary: dict[str, Any] = field(default_factory=dict)  # extra fields for summary.json
    report: Callable[[dict, Path], None] | None = None  # prints the end-of-run report (rank 0)

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total_steps}")

    def eval_every(self, requested: int | None) -> int:
        """Steps between evaluations: ``--eval-every`` as given (0: only at the end), or, when the
        command leaves it unset (None, finetune's default), four evaluations per run."""
        return requested if requested is not None else math.ceil(self.total_steps / 4)
