"""Run every (part, seed, variant) of the study through the real training commands.

Each run is ``bertopt pretrain`` or ``bertopt finetune`` run in-process (the command skeleton,
:func:`bertopt.train.command.train`) on a config built from the part's settings and the variant's
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

from bertopt.errors import Terminated, UsageError, exit_code, explain
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
    seeds: int  # default number of seeds
    sweep: dict[str, tuple[float, ...]] = field(default_factory=dict)  # variant -> LRs tried
    sweep_metric: Metric | None = None  # chooses the LR (a dev metric)
    lr_from: dict[str, str] = field(default_factory=dict)  # variant -> the swept variant whose LR it uses
    failure_table: bool = False  # report failed runs per arm (the few-sample parts)

    def __post_init__(self) -> None:
        """The settings are checked against the typed configs when the part is declared, not when its
        first run starts: an unknown field or a value out of range names the part."""
        from bertopt.study.variants import BY_NAME

        try:
            for variant in self.variants:
                for lr in {self.lr, *self.sweep.get(variant, ())}:
                    build_config(self, BY_NAME[variant], seed=0, lr=lr, out_dir=Path("."))
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"study part {self.key!r}: {exc}") from exc


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


class StudyError(RuntimeError):
    """A study run failed in a way the study cannot record as a result (the message says which run and why)."""


def _fingerprint(config) -> dict:
    """The settings that make a run what it is (not where it is written or how it reports progress)."""
    import dataclasses

    data = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for key in ("out", "progress", "overwrite", "resume", "fsdp"):  # fsdp: how it is sharded, not what it is
        data["run"].pop(key, None)
    return data


# What summary.json records of a run's settings, checked when no study-config.json is there (runs
# started by hand with the same flags, e.g. a sweep run split off to another machine).
_SUMMARY_KEYS = ("optimizer", "lr", "weight_decay", "weight_decay_mode", "bias_correction", "max_grad_norm",
                 "warmup_proportion", "schedule_style", "seed", "batch_size")


def _check_reused(summary: dict, config, out_dir: Path) -> None:
    """A finished run is reused only if it is the run asked for: a study edited since must not mix settings."""
    saved = out_dir / SETTINGS
    if saved.exists():
        have, want = _flat(json.loads(saved.read_text())), _flat(_fingerprint(config))
        have.pop("fsdp", None)  # written by bertopt before fsdp moved from PretrainConfig to RunConfig
        diff = sorted(k for k in set(have) | set(want) if not _same(have.get(k), want.get(k)))
    else:
        ran = summary.get("run", {})
        wanted = {**config.optim.settings(), "seed": config.run.seed, "batch_size": config.run.batch_size}
        if config.steps is not None:
            wanted["total_steps"] = config.steps
        ran = {**ran, "total_steps": summary.get("total_steps")}  # the run's length is a summary field
        diff = [k for k in (*_SUMMARY_KEYS, "total_steps") if k in wanted and not _same(ran.get(k), wanted[k])]
    if diff:
        raise UsageError(f"{out_dir} holds a finished run whose settings differ from what this study asks for "
                         f"({', '.join(diff)}): delete that directory (or choose another --out) and run the study again")


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))


class _Lock:
    """An exclusive ``flock`` on ``<run dir>.lock``, held while a process decides whether to train
    that run and while it trains it. The kernel drops it when the process dies, so a killed study
    never leaves a run locked; the file itself stays (unlinking it would let a second process lock
    a new file of the same name)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir.with_name(out_dir.name + ".lock")
        self._fd: int | None = None

    def acquire(self, block: bool = False) -> bool:
        """Take the lock; if another process holds it: False at once, or with ``block`` wait
        until it is released (its holder finished or died)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:  # e.g. SIGTERM while waiting
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
        self._fd = fd
        return True

    def held(self) -> bool:
        """Whether a process holds the lock now: a shared probe on a read-only descriptor, so it
        needs no write access and creates nothing (for --report-only)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # drops the probe

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


DIVERGED = "study-diverged.json"
SETTINGS = "study-config.json"  # the run's settings, written after its summary: a run is complete with it


def _diverged_summary(out_dir: Path) -> dict | None:
    """A run that stopped on a non-finite loss is a result (its metrics are NaN), not a failure to retry."""
    path = out_dir / DIVERGED
    return json.loads(path.read_text()) if path.exists() else None


def _train(spec: TaskSpec, config, out_dir: Path, name: str) -> float:
    from bertopt.train import command
    from bertopt.train.job import NonFiniteLoss

    start = time.perf_counter()
    captured, errors = io.StringIO(), io.StringIO()
    failure = None
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(errors):
            summary = command.train(spec.command, config)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded or reported below
        failure = exc
    out_dir.mkdir(parents=True, exist_ok=True)  # a run that failed before its first file still gets our records
    if failure is None:
        if summary.get("stopped_by"):  # the run saved a checkpoint and stopped: so does the study
            raise KeyboardInterrupt if summary["stopped_by"] == "SIGINT" else Terminated
    elif isinstance(failure, NonFiniteLoss):  # diverged: a result, recorded with the run's error message
        message = f"bertopt {spec.command}: error: {explain(failure)}"
        diverged = {"diverged": message[-1000:], "wall_time_s": time.perf_counter() - start,
                    **{m.key: float("nan") for m in spec.metrics}, "run": {"lr": config.optim.lr, "seed": config.run.seed}}
        (out_dir / DIVERGED).write_text(json.dumps(diverged, indent=1) + "\n")
    else:
        message = f"bertopt {spec.command}: error: {explain(failure)}"
        raise StudyError(f"study run {name} failed (exit {exit_code(failure)}): {message[-1500:]}") from failure
    (out_dir / SETTINGS).write_text(json.dumps(_fingerprint(config), indent=1) + "\n")
    return time.perf_counter() - start


def _result(out_dir: Path) -> dict | None:
    """A run's summary if it has finished (or diverged, which is a result too), else None."""
    return finished_summary(out_dir) or _diverged_summary(out_dir)


def run_one(spec: TaskSpec, variant: Variant, seed: int, lr: float, out_dir: Path, *,
            log: Callable[[str], None], wait: bool = True, train: bool = True) -> RunRecord | None:
    """One training run, or its finished result from earlier. If another process holds the run,
    wait for it (``wait``) or return None; if it has not finished and ``train`` is False, None."""
    name = f"{spec.key}/{out_dir.parent.name}/seed{seed}"
    config = build_config(spec, variant, seed, lr, out_dir)
    seconds = 0.0
    if not train:  # --report-only: only read; never lock for writing, never wait
        summary = _result(out_dir)
        if summary is None or (not (out_dir / SETTINGS).exists() and _Lock(out_dir).held()):
            return None  # unfinished, or its process has not written the run's settings yet
    else:
        # Decide under the lock: the process holding it may have written the run's summary
        # but not yet its settings.
        lock = _Lock(out_dir)
        if not lock.acquire():
            if not wait:
                return None
            log(f"  {name}: waiting for the process that holds {lock.path.name} to finish it")
            lock.acquire(block=True)  # returns the moment that process releases it (or dies)
        try:
            summary = _result(out_dir)
            if summary is None:
                seconds = _train(spec, config, out_dir, name)
                summary = _result(out_dir)
                if summary is None:
                    raise StudyError(f"study run {name} wrote no complete summary in {out_dir}")
                log(f"  {name:<34} lr {lr:<8.3g} " + ", ".join(
                    f"{m.key} {float(summary.get(m.key, float('nan'))):.4f}" for m in spec.metrics)
                    + (" DIVERGED" if "diverged" in summary else "") + f" ({seconds:.0f} s)")
        finally:
            lock.release()
    if "diverged" not in summary:
        _check_reused(summary, config, out_dir)
    if not seconds:  # a finished run from earlier: its own wall time
        seconds = float(summary.get("wall_time_s") or summary.get("wall_time_s_this_process") or 0.0)
    metrics = out_dir / "metrics.jsonl"
    curve, lr_curve = _read_curves(metrics) if metrics.exists() else ([], [])
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


def _run_all(jobs: list[tuple], log: Callable[[str], None], train: bool = True) -> list[RunRecord]:
    """Run each (spec, variant, seed, lr, out_dir) not held by another process, then wait for those that
    were. Without ``train``: only the finished ones."""
    done: dict[int, RunRecord] = {}
    for i, job in enumerate(jobs):
        if (record := run_one(*job, log=log, wait=False, train=train)) is not None:
            done[i] = record
    if not train:
        return [done[i] for i in sorted(done)]
    for i, job in enumerate(jobs):
        if i not in done:
            done[i] = run_one(*job, log=log, wait=True)
    return [done[i] for i in range(len(jobs))]


def run_sweep(spec: TaskSpec, variants: dict[str, Variant], out: Path, *, log: Callable[[str], None],
              train: bool = True) -> list[SweepResult] | None:
    """Each swept variant's runs and chosen LR; None if ``train`` is False and a sweep run has not finished."""
    if not spec.sweep:
        return []
    metric = spec.sweep_metric or spec.metrics[0]
    jobs = [(spec, variants[name], SWEEP_SEED, lr, out / "sweeps" / spec.key / f"{name}_lr{lr:g}" / f"seed{SWEEP_SEED}")
            for name, lrs in spec.sweep.items() for lr in lrs]
    records = _run_all(jobs, log, train)
    if len(records) < len(jobs):
        return None
    results = []
    for name in spec.sweep:
        runs = [r for r in records if r.variant == name]
        best = max(runs, key=lambda r: _goodness(float(r.summary[metric.key]), metric))
        results.append(SweepResult(spec.key, name, metric, runs, best.lr))
    return results


def _goodness(value: float, metric: Metric) -> tuple[bool, float]:
    """Sort key, larger is better; a diverged run (NaN) is worse than any finite one."""
    return (math.isfinite(value), value if metric.higher_is_better else -value)


def lr_of(spec: TaskSpec, variant: str, sweeps: list[SweepResult]) -> float:
    chosen = {s.variant: s.chosen_lr for s in sweeps}
    return chosen.get(variant, chosen.get(spec.lr_from.get(variant, ""), spec.lr))


def run_grid(specs: list[TaskSpec], variants: dict[str, Variant], seeds: dict[str, list[int]], out: Path, *,
             log: Callable[[str], None] = print, train: bool = True) -> tuple[list[RunRecord], list[SweepResult]]:
    """Every part: its sweep (if any), then its variants x seeds. ``seeds`` maps part key -> seeds.
    Without ``train``, only what has finished (a part whose sweep has not is left out)."""
    records, sweeps = [], []
    for spec in specs:
        log(f"{spec.title}: {len(spec.variants)} variants x {len(seeds[spec.key])} seeds"
            + (f" after an LR sweep of {sum(map(len, spec.sweep.values()))} runs" if spec.sweep else ""))
        spec_sweeps = run_sweep(spec, variants, out, log=log, train=train)
        if spec_sweeps is None:
            log("  its LR sweep has not finished: left out of the report")
            continue
        sweeps += spec_sweeps
        jobs = [(spec, variants[name], seed, lr_of(spec, name, spec_sweeps), out / "runs" / spec.key / name / f"seed{seed}")
                for seed in seeds[spec.key] for name in spec.variants]
        part = _run_all(jobs, log, train)
        if len(part) < len(jobs):
            log(f"  {len(part)} of {len(jobs)} runs have finished")
        records += part
    return records, sweeps
