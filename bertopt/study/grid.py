"""Run every (task, seed, variant) of the study through the real training commands.

Each run is ``bertopt pretrain`` or ``bertopt finetune`` run in-process (the command skeleton,
:func:`bertopt.train.command.run`) on a config built from the task's settings and the variant's
optimizer settings, into ``<out>/runs/<task>/<variant>/seed<k>/``. Runs of one seed share the model
initialisation and the data order (both follow ``--seed``), so variants are compared on equal
terms. Variants are interleaved within a seed, so a machine that slows down mid-study slows all
variants alike. A finished run (its ``summary.json`` says all steps completed) is not run again:
an interrupted study picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bertopt.study.variants import Variant
from bertopt.train.report import finished_summary


@dataclass(frozen=True)
class Metric:
    key: str  # key in summary.json
    label: str
    higher_is_better: bool


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the CLI command
    title: str
    lr: float
    batch_size: int
    steps: int
    settings: dict  # the command's own settings (model size, data subset) and run settings under "run"
    metrics: tuple[Metric, ...]
    variants: tuple[str, ...]  # which variants run on this task


@dataclass
class RunRecord:
    task: str
    variant: str
    seed: int
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


def build_config(spec: TaskSpec, variant: Variant, seed: int, out_dir: Path):
    """The PretrainConfig / FinetuneConfig of one study run."""
    import dataclasses

    from bertopt.train.config import FinetuneConfig, PretrainConfig

    config_class = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[spec.name]
    batch_size, steps = variant.batch_and_steps(spec.batch_size, spec.steps)
    settings = dict(spec.settings)
    run = dataclasses.replace(config_class().run, batch_size=batch_size, seed=seed, out=out_dir, progress=False,
                              **settings.pop("run", {}))
    return config_class(optim=variant.optim(spec.lr), run=run, steps=steps, **settings)


def run_one(spec: TaskSpec, variant: Variant, seed: int, out_dir: Path, *, log: Callable[[str], None]) -> RunRecord:
    """One training run (or its finished result from an earlier study run)."""
    from bertopt.train import command, finetune, pretrain

    summary = finished_summary(out_dir)
    seconds = 0.0
    if summary is None:
        config = build_config(spec, variant, seed, out_dir)
        build_job = {"pretrain": pretrain.build_job, "finetune": finetune.build_job}[spec.name]
        start = time.perf_counter()
        captured, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(errors):
            code = command.run(spec.name, config, build_job)
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"study run {spec.name}/{variant.name}/seed{seed} failed (exit {code}):\n"
                               f"{config}\n{captured.getvalue()[-2000:]}{errors.getvalue()[-2000:]}")
        summary = finished_summary(out_dir)
        if summary is None:
            raise RuntimeError(f"study run {spec.name}/{variant.name}/seed{seed} wrote no complete summary in {out_dir}")
        log(f"  {spec.name:<9} {variant.name:<10} seed {seed}: "
            + ", ".join(f"{m.key} {summary.get(m.key, float('nan')):.4f}" for m in spec.metrics)
            + f" ({seconds:.0f} s)")
    if not seconds:  # a finished run from earlier: its own wall time
        seconds = float(summary.get("wall_time_s") or summary.get("wall_time_s_this_process") or 0.0)
    curve, lr_curve = _read_curves(out_dir / "metrics.jsonl")
    return RunRecord(spec.name, variant.name, seed, summary, curve, lr_curve, seconds, out_dir)


def run_grid(specs: list[TaskSpec], variants: dict[str, Variant], seeds: list[int], out: Path, *,
             log: Callable[[str], None] = print) -> list[RunRecord]:
    records = []
    for spec in specs:
        log(f"{spec.title}: {len(spec.variants)} variants x {len(seeds)} seeds")
        for seed in seeds:
            for name in spec.variants:
                records.append(run_one(spec, variants[name], seed, out / "runs" / spec.name / name / f"seed{seed}", log=log))
    return records
