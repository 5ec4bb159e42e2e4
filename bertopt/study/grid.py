"""Run every (part, seed, variant) of the study through the real training commands.

Each run is ``bertopt pretrain`` or ``bertopt finetune`` run in-process (the command skeleton,
:func:`bertopt.train.command.run`) on a config built from the part's settings and the variant's
optimizer settings, into ``<out>/runs/<part>/<variant>/seed<k>/``. Runs of one seed share the
model initialisation and the data order (both follow ``--seed``), so variants are compared on
equal terms, paired by seed. Variants are interleaved within a seed, so a machine that slows down
mid-study slows all variants alike.

A part may choose each variant's learning rate by a sweep on :data:`SWEEP_SEED`, a seed the study
does not otherwise use, judged on a development metric (never the test split); the runs live in
``<out>/sweeps/<part>/<variant>_lr<lr>/``.

A finished run (its ``summary.json`` says all steps completed) is not run again, so an interrupted
study picks up where it stopped. Several processes may work on one study at once (the same
command started twice uses both cores): a process claims a run with a lock file beside its
directory, skips runs another live process holds, and waits for them before it reports.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bertopt.errors import EXIT_SIGINT, EXIT_SIGTERM, Terminated
from bertopt.study.variants import Variant
from bertopt.train.report import finished_summary

SWEEP_SEED = 100


@dataclass(frozen=True)
class Metric:
    key: str  # key in summary.json
    label: str
    higher_is_better: bool


@dataclass(frozen=True)
class TaskSpec:
    """One part of the study: a task, its variants and seeds, and how each variant's LR is set."""

    key: str  # names the part: runs/<key>/..., its report section and its JSON entries
    command: str  # "pretrain" or "finetune"
    title: str
    lr: float  # every variant's LR unless the sweep chooses one
    batch_size: int
    steps: int | None  # None: the command's own (finetune: its --epochs setting)
    settings: dict  # the command's own settings, and run settings under "run"
    metrics: tuple[Metric, ...]  # the first one decides
    variants: tuple[str, ...]
    baseline: str
    seeds: int  # default number of seeds
    sweep: dict[str, tuple[float, ...]] = field(default_factory=dict)  # variant -> LRs tried
    sweep_metric: Metric | None = None  # chooses the LR (a dev metric)
    lr_from: dict[str, str] = field(default_factory=dict)  # variant -> the swept variant whose LR it uses


@dataclass
class RunRecord:
    task: str  # the part's key
    variant: str
    seed: int
    lr: float
    summary: dict
    curve: list[tuple[int, float]]  # (step, training loss)
    lr_curve: list[tuple[int, float]]
    seconds: float
    out_dir: Path = field(default=Path())


def _read_curves(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    curve, lrs = [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if isinstance(record.get("loss"), (int, float)):
            curve.append((record["step"], float(record["loss"])))
        if isinstance(record.get("lr"), (int, float)):
            lrs.append((record["step"], float(record["lr"])))
    return curve, lrs


def build_config(spec: TaskSpec, variant: Variant, seed: int, lr: float, out_dir: Path):
    """The PretrainConfig / FinetuneConfig of one study run."""
    import dataclasses

    from bertopt.train.config import FinetuneConfig, PretrainConfig

    config_class = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[spec.command]
    settings = dict(spec.settings)
    # overwrite: a run a killed study left unfinished starts again from scratch
    run = dataclasses.replace(config_class().run, batch_size=spec.batch_size, seed=seed, out=out_dir,
                              progress=False, overwrite=True, **settings.pop("run", {}))
    if spec.steps is not None:
        settings["steps"] = spec.steps
    return config_class(optim=variant.optim(lr), run=run, **settings)


def _check_reused(summary: dict, config, out_dir: Path) -> None:
    """A finished run is reused only if it is the run asked for (a study edited since would mix settings)."""
    ran = summary.get("run", {})
    for key, wanted in (("lr", config.optim.lr), ("seed", config.run.seed), ("batch_size", config.run.batch_size),
                        ("optimizer", config.optim.optimizer), ("weight_decay", config.optim.weight_decay)):
        have = ran.get(key)
        if have is not None and have != wanted and not (isinstance(have, float) and math.isclose(have, wanted)):
            raise RuntimeError(f"{out_dir} holds a finished run with {key}={have!r}, but this study asks for "
                               f"{wanted!r}: delete that directory (or use another --out) and run the study again")


class _Lock:
    """``<run dir>.lock`` holding the pid of the process training that run."""

    def __init__(self, out_dir: Path):
        self.path = out_dir.with_name(out_dir.name + ".lock")

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    return False
                self.path.unlink(missing_ok=True)  # left by a process that died
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        return False

    def _holder_alive(self) -> bool:
        try:
            pid = int(self.path.read_text() or "0")
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            return False
        except PermissionError:
            return True
        return pid != os.getpid()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _train(spec: TaskSpec, config, out_dir: Path, name: str) -> float:
    from bertopt.train import command, finetune, pretrain

    build_job = {"pretrain": pretrain.build_job, "finetune": finetune.build_job}[spec.command]
    start = time.perf_counter()
    captured, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(errors):
        code = command.run(spec.command, config, build_job)
    if code in (EXIT_SIGINT, EXIT_SIGTERM):  # the run saved a checkpoint and stopped: so does the study
        raise KeyboardInterrupt if code == EXIT_SIGINT else Terminated
    if code != 0:
        raise RuntimeError(f"study run {name} failed (exit {code}):\n{config}\n"
                           f"{captured.getvalue()[-2000:]}{errors.getvalue()[-2000:]}")
    return time.perf_counter() - start


def run_one(spec: TaskSpec, variant: Variant, seed: int, lr: float, out_dir: Path, *,
            log: Callable[[str], None], wait: bool = True) -> RunRecord | None:
    """One training run, or its finished result from earlier. If another process holds the run,
    wait for it (``wait``) or return None."""
    name = f"{spec.key}/{out_dir.parent.name}/seed{seed}"
    config = build_config(spec, variant, seed, lr, out_dir)
    seconds = 0.0
    while (summary := finished_summary(out_dir)) is None:
        lock = _Lock(out_dir)
        if not lock.acquire():
            if not wait:
                return None
            time.sleep(5)
            continue
        try:
            if finished_summary(out_dir) is None:  # not finished while we waited for the lock
                seconds = _train(spec, config, out_dir, name)
                if finished_summary(out_dir) is None:
                    raise RuntimeError(f"study run {name} wrote no complete summary in {out_dir}")
                summary = finished_summary(out_dir)
                log(f"  {name:<34} lr {lr:<8.3g} " + ", ".join(
                    f"{m.key} {summary.get(m.key, float('nan')):.4f}" for m in spec.metrics) + f" ({seconds:.0f} s)")
        finally:
            lock.release()
    _check_reused(summary, config, out_dir)
    if not seconds:  # a finished run from earlier: its own wall time
        seconds = float(summary.get("wall_time_s") or summary.get("wall_time_s_this_process") or 0.0)
    curve, lr_curve = _read_curves(out_dir / "metrics.jsonl")
    return RunRecord(spec.key, variant.name, seed, lr, summary, curve, lr_curve, seconds, out_dir)


@dataclass
class SweepResult:
    task: str
    variant: str
    metric: Metric
    runs: list[RunRecord]
    chosen_lr: float

    def to_json(self) -> dict:
        return {"task": self.task, "variant": self.variant, "seed": SWEEP_SEED, "chosen_by": self.metric.key,
                "runs": [{"lr": r.lr, **{k: r.summary.get(k) for k in ("dev_accuracy", "test_accuracy", "eval_loss",
                                                                         "eval_accuracy") if k in r.summary}}
                         for r in self.runs],
                "chosen_lr": self.chosen_lr}


def _run_all(jobs: list[tuple], log: Callable[[str], None]) -> list[RunRecord]:
    """Run each (spec, variant, seed, lr, out_dir) not held by another process, then wait for those that were."""
    done: dict[int, RunRecord] = {}
    for i, job in enumerate(jobs):
        if (record := run_one(*job, log=log, wait=False)) is not None:
            done[i] = record
    for i, job in enumerate(jobs):
        if i not in done:
            done[i] = run_one(*job, log=log, wait=True)
    return [done[i] for i in range(len(jobs))]


def run_sweep(spec: TaskSpec, variants: dict[str, Variant], out: Path, *, log: Callable[[str], None]) -> list[SweepResult]:
    if not spec.sweep:
        return []
    metric = spec.sweep_metric or spec.metrics[0]
    jobs = [(spec, variants[name], SWEEP_SEED, lr, out / "sweeps" / spec.key / f"{name}_lr{lr:g}" / f"seed{SWEEP_SEED}")
            for name, lrs in spec.sweep.items() for lr in lrs]
    records = _run_all(jobs, log)
    results = []
    for name in spec.sweep:
        runs = [r for r in records if r.variant == name]
        best = (max if metric.higher_is_better else min)(runs, key=lambda r: r.summary[metric.key])
        results.append(SweepResult(spec.key, name, metric, runs, best.lr))
    return results


def lr_of(spec: TaskSpec, variant: str, sweeps: list[SweepResult]) -> float:
    chosen = {s.variant: s.chosen_lr for s in sweeps}
    return chosen.get(variant, chosen.get(spec.lr_from.get(variant, ""), spec.lr))


def run_grid(specs: list[TaskSpec], variants: dict[str, Variant], seeds: dict[str, list[int]], out: Path, *,
             log: Callable[[str], None] = print) -> tuple[list[RunRecord], list[SweepResult]]:
    """Every part: its sweep (if any), then its variants x seeds. ``seeds`` maps part key -> seeds."""
    records, sweeps = [], []
    for spec in specs:
        log(f"{spec.title}: {len(spec.variants)} variants x {len(seeds[spec.key])} seeds"
            + (f" after an LR sweep of {sum(map(len, spec.sweep.values()))} runs" if spec.sweep else ""))
        spec_sweeps = run_sweep(spec, variants, out, log=log)
        sweeps += spec_sweeps
        jobs = [(spec, variants[name], seed, lr_of(spec, name, spec_sweeps), out / "runs" / spec.key / name / f"seed{seed}")
                for seed in seeds[spec.key] for name in spec.variants]
        records += _run_all(jobs, log)
    return records, sweeps
