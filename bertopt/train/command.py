"""What ``bertopt pretrain`` and ``bertopt finetune`` share: one command skeleton.

    summary = train("pretrain", config)      # raises on errors
    code = run("pretrain", config)           # the same, as an exit code with one-paragraph errors

The skeleton owns the output directory rules (an unfinished run is never replaced silently; a
finished one is cleared for a fresh start), threads (0: automatic; restored afterwards),
processes, precision, compilation and the optimizer (:func:`build_optimizer`, i.e.
``bertopt.create_optimizer``); then it hands the command's :class:`~bertopt.train.job.Job` (built
by :data:`BUILD_JOB`) and the config's :class:`~bertopt.train.config.RunConfig` to the loop, which
trains, exports the model to ``<out>/model`` and writes ``summary.json``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bertopt.errors import (EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, TRAIN_EXTRA, MissingExtra, UsageError,
                            missing_extra_message, report_error)
from bertopt.train.config import OptimConfig, RunConfig
from bertopt.train.job import Job

PLOTS = ("loss.png", "lr.png")
BUILD_JOB = {"pretrain": "bertopt.train.pretrain", "finetune": "bertopt.train.finetune"}  # module with build_job()


def build_job(command: str, config, ctx, log) -> Job:
    """The Job of ``bertopt <command>``: the one place that maps a command to its module."""
    import importlib

    return importlib.import_module(BUILD_JOB[command]).build_job(config, ctx, log)


def build_optimizer(model, optim: OptimConfig, num_train_steps: int):
    """``(optimizer, scheduler)`` for ``model``: :func:`bertopt.create_optimizer` with these settings,
    passing only the non-default variants, so the call is Google's recipe unless asked otherwise."""
    import bertopt

    overrides: dict[str, Any] = {}
    if optim.bias_correction is not None:
        overrides["bias_correction"] = optim.bias_correction
    if optim.weight_decay_mode != "decoupled":
        overrides["weight_decay_mode"] = optim.weight_decay_mode
    return bertopt.create_optimizer(
        model, optim.lr, num_train_steps, optim.warmup_steps, optimizer=optim.optimizer,
        weight_decay=optim.weight_decay, max_grad_norm=optim.max_grad_norm or None,
        schedule_style=optim.schedule_style, warmup_proportion=optim.warmup_proportion, **overrides)


def require_train_extra(command: str) -> None:
    """MissingExtra with the pip line unless every package of the `train` extra can be imported."""
    missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(missing_extra_message(command, missing))


def prepare_out_dir(out: Path, run: RunConfig) -> None:
    """Refuse to silently replace an unfinished run; clear a finished one for a fresh start; check
    that ``out`` is writable. Nothing to do when resuming."""
    from bertopt.train.checkpoint import ensure_writable_dir, latest_checkpoint
    from bertopt.train.report import finished_summary

    if run.resume is None and (latest := latest_checkpoint(out / "checkpoints")) is not None:
        if finished_summary(out) is None and not run.overwrite:
            total = latest.meta.get("run", {}).get("steps", latest.meta.get("run", {}).get("total_steps", "?"))
            raise UsageError(
                f"{out} holds an unfinished run (last checkpoint at step {latest.step} of {total}). "
                "Continue it with --resume, start over with --overwrite (deletes it), or choose another --out."
            )
        for name in ("checkpoints", "model"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", *PLOTS):
            (out / name).unlink(missing_ok=True)
    ensure_writable_dir(out, "--out")


def compile_model(model):
    """``torch.compile`` the model's forward in place (parameter names, hence checkpoints, stay as
    they are) and run nothing yet; compilation happens on the first step. The loop reports its cost."""
    try:
        model.compile()
    except Exception as exc:  # noqa: BLE001 - any failure to set up compilation
        raise UsageError(_compile_advice(exc)) from exc
    return model


def _compile_advice(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return (f"--compile: torch.compile failed ({type(exc).__name__}: {first}). On a CPU it needs a working C++ "
            "compiler (g++ or clang++; set CXX to choose one); run without --compile to train uncompiled")


def train(name: str, config) -> dict[str, Any]:
    """Run ``bertopt <name>`` as ``config`` (a PretrainConfig / FinetuneConfig) says; returns the
    summary (empty on ranks other than 0). Raises ValueError for bad input, CheckpointError /
    TrainingError (NonFiniteLoss: the run diverged) when training cannot go on."""
    require_train_extra(name)
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: everything here is local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch

    from bertopt.train.distributed import choose_threads, init_distributed, teardown_distributed, wrap_model
    from bertopt.train.loop import run_training
    from bertopt.train.precision import MixedPrecision, precision_note

    started = time.perf_counter()
    run: RunConfig = config.run
    ctx = init_distributed(run.device)
    log = _logger(ctx)
    threads_before = torch.get_num_threads()  # restored at the end: train() may run inside a bigger program
    try:
        torch.set_num_threads(threads := choose_threads(run.threads, world_size=ctx.world_size))
        amp = MixedPrecision.for_device(run.precision, ctx.device)
        if (note := precision_note(run.precision, ctx.device)) is not None:
            log(note)
        run.micro_batch_size(ctx.world_size)  # --batch-size / processes / --grad-accum-steps must divide
        if ctx.is_main:
            prepare_out_dir(run.out, run)
        ctx.barrier()
        job = build_job(name, config, ctx, log)
        model = wrap_model(job.model, ctx, fsdp=run.fsdp, shard_modules=job.shard_modules)
        if run.compile:
            compile_model(model)
        optimizer, scheduler = build_optimizer(model, config.optim, job.total_steps)
        log(f"{threads} thread{'s' if threads > 1 else ''}; precision {run.precision}"
            + (f"; {run.grad_accum_steps} micro-batches of {run.micro_batch_size(ctx.world_size)} per step"
               if run.grad_accum_steps > 1 else "") + ("; compiled" if run.compile else ""))
        try:
            result = run_training(job, run, optimizer, scheduler, model=model, ctx=ctx, amp=amp, started=started)
        except Exception as exc:
            if run.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise UsageError(_compile_advice(exc)) from exc  # compilation happens in the first step
            raise
        if result.stopped_by:
            log(f"stopped by {result.stopped_by} after step {result.step}; checkpoint saved: "
                f"{result.checkpoint}. Continue with: bertopt {name} --resume (and the same flags)")
        return result.summary
    finally:
        torch.set_num_threads(threads_before)
        teardown_distributed(ctx)


def run(name: str, config, *, debug: bool = False) -> int:
    """:func:`train` as an exit code: errors reported as one paragraph (ValueError: bad input, 2;
    anything else: failed, 1; raised with ``debug``), else 0 when done or 130/143 when it stopped
    on SIGINT/SIGTERM after saving a checkpoint. The CLI calls this."""
    try:
        summary = train(name, config)
    except Exception as exc:
        if debug:
            raise
        return report_error(name, exc)
    return exit_code_of(summary)


def exit_code_of(summary: dict[str, Any]) -> int:
    """0 for a finished run, 130 / 143 for one a SIGINT / SIGTERM stopped (after saving a checkpoint)."""
    return {None: EXIT_OK, "SIGINT": EXIT_SIGINT}.get(summary.get("stopped_by"), EXIT_SIGTERM)


def _logger(ctx):
    def log(message: str) -> None:
        if ctx.is_main:
            print(message, flush=True)
    return log
