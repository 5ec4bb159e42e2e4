"""What ``bertopt pretrain`` and ``bertopt finetune`` share: one command skeleton.

    summary = train(config, build_job)      # raises on errors
    code = run(name, config, build_job)     # the same, as an exit code with one-paragraph errors

The skeleton owns the output directory rules (an unfinished run is never replaced silently; a
finished one is cleared for a fresh start), threads (0: automatic; restored afterwards),
processes, precision, compilation, the optimizer (:func:`build_optimizer`, i.e.
``bertopt.create_optimizer``), the loop, the atomic export of the trained model to
``<out>/model`` and ``summary.json``. A command supplies a :class:`Job`: its model, task, step
count, run info and how to export the model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bertopt.errors import (EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, TRAIN_EXTRA, MissingExtra, UsageError,
                            missing_extra_message, report_error)
from bertopt.train.config import OptimConfig, RunConfig

PLOTS = ("loss.png", "lr.png")


@dataclass
class Job:
    """What a training command supplies to the skeleton."""

    model: Any  # the torch module to train (unwrapped)
    task: Any  # a loop.TrainingTask
    total_steps: int
    title: str
    run_info: dict[str, Any]  # into checkpoints and summary.json
    resume_must_match: tuple[str, ...]  # run_info keys a checkpoint must share to be resumed
    export: Callable[[dict, Path], None]  # write the trained model (full state dict) as a directory
    shard_modules: Any = ()  # blocks FSDP2 shards separately
    finish: Callable | None = None  # extra evaluation after the last step (fields for summary.json)
    plot_eval_loss: str = "eval_loss"
    plot_eval_metric: str | None = "eval_accuracy"
    eval_every: int = 0
    summary: dict[str, Any] = field(default_factory=dict)  # extra fields for summary.json
    report: Callable[[dict, Path], None] | None = None  # prints the end-of-run report (rank 0)


def build_optimizer(model, optim: OptimConfig, num_train_steps: int):
    """``(optimizer, scheduler)`` for ``model``: :func:`bertopt.create_optimizer` with these settings,
    passing only the non-default variants, so the call is Google's recipe unless asked otherwise."""
    import bertopt

    optim.check_steps(num_train_steps)
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
    from bertopt.train.checkpoint import latest_checkpoint
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


def ensure_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it (more
    reliable than ``os.access``, which says yes to root on read-only or immutable directories).
    UsageError naming the flag, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bertopt-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"{flag} {path}: cannot write there ({reason}); choose a directory you can write to") from None


def export_atomically(write: Callable[[Path], None], directory: Path) -> Path:
    """``write(tmp)`` into a temporary sibling directory, then replace ``directory`` with it, so a
    crash leaves the old directory or the new one, never half of one."""
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


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


def train(name: str, config, build_job: Callable[..., Job]) -> dict[str, Any]:
    """Run a training command; returns the summary (empty on ranks other than 0). Raises ValueError
    for bad input, CheckpointError / TrainingError when training cannot go on."""
    require_train_extra(name)
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: everything here is local
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch

    from bertopt.train.checkpoint import get_model_state
    from bertopt.train.distributed import choose_threads, init_distributed, teardown_distributed, wrap_model
    from bertopt.train.loop import LoopConfig, run_training
    from bertopt.train.precision import MixedPrecision, precision_note
    from bertopt.train.report import write_summary

    wall_start = time.perf_counter()
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
        job = build_job(config, ctx, log)
        model = wrap_model(job.model, ctx, fsdp=getattr(config, "fsdp", False), shard_modules=job.shard_modules)
        if run.compile:
            compile_model(model)
        optimizer, scheduler = build_optimizer(model, config.optim, job.total_steps)
        log(f"{threads} thread{'s' if threads > 1 else ''}; precision {run.precision}"
            + (f"; {run.grad_accum_steps} micro-batches of {run.micro_batch_size(ctx.world_size)} per step"
               if run.grad_accum_steps > 1 else "") + ("; compiled" if run.compile else ""))
        loop_config = LoopConfig(
            out_dir=run.out, total_steps=job.total_steps, log_every=run.log_every, eval_every=job.eval_every,
            save_every=run.save_every, keep_checkpoints=run.keep_checkpoints, resume=run.resume,
            progress=run.progress, title=job.title, run_info=job.run_info, resume_must_match=job.resume_must_match,
            plot_eval_loss=job.plot_eval_loss, plot_eval_metric=job.plot_eval_metric, eval_at_start=True,
            on_nonfinite=run.on_nonfinite, grad_accum_steps=run.grad_accum_steps, precision=run.precision)
        try:
            result = run_training(model, optimizer, scheduler, job.task, loop_config, ctx, finish=job.finish, amp=amp)
        except Exception as exc:
            if run.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise UsageError(_compile_advice(exc)) from exc  # compilation happens in the first step
            raise
        model_state = get_model_state(model)  # collective under FSDP2: every rank takes part
        summary: dict[str, Any] = {}
        if ctx.is_main:
            summary = dict(result.summary) | job.summary
            summary["model_dir"] = None
            if result.stopped_by is None:
                summary["model_dir"] = str(export_atomically(lambda d: job.export(model_state, d), run.out / "model"))
            summary["wall_time_s"] = summary["wall_time_s_this_process"] = round(time.perf_counter() - wall_start, 2)
            write_summary(run.out / "summary.json", summary)
            if job.report is not None:
                job.report(summary, run.out)
        ctx.barrier()
        if result.stopped_by:
            log(f"stopped by {result.stopped_by} after step {result.step}; checkpoint saved: "
                f"{result.checkpoint}. Continue with: bertopt {name} --resume (and the same flags)")
        return summary
    finally:
        torch.set_num_threads(threads_before)
        teardown_distributed(ctx)


def run(name: str, config, build_job: Callable[..., Job], *, debug: bool = False) -> int:
    """:func:`train` as an exit code: errors reported as one paragraph (ValueError: bad input, 2;
    anything else: failed, 1; raised with ``debug``), else 0 when done or 130/143 when it stopped
    on SIGINT/SIGTERM after saving a checkpoint. The CLI and the study call this."""
    try:
        summary = train(name, config, build_job)
    except Exception as exc:
        if debug:
            raise
        return report_error(name, exc)
    return {None: EXIT_OK, "SIGINT": EXIT_SIGINT}.get(summary.get("stopped_by"), EXIT_SIGTERM)


def _logger(ctx):
    def log(message: str) -> None:
        if ctx.is_main:
            print(message, flush=True)
    return log
