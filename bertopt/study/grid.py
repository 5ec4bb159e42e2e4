"""Run every (task, seed, variant) of the study through the real training commands.

Each run is ``bertopt pretrain`` or ``bertopt finetune`` called in-process with the variant's
flags, into ``<out>/runs/<task>/<variant>/seed<k>/``. Runs of one seed share the model
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
    extra_flags: tuple[str, ...]  # size of the model, data subset, evaluation cadence
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


def _finished(out_dir: Path) -> dict | None:
    path = out_dir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if summary.get("steps_completed") != summary.get("total_steps") or summary.get("stopped_by"):
        return None
    return summary


def run_one(spec: TaskSpec, variant: Variant, seed: int, out_dir: Path, *, log: Callable[[str], None]) -> RunRecord:
    """One training run (or its finished result from an earlier study run)."""
    from bertopt.cli import build_parser

    summary = _finished(out_dir)
    seconds = 0.0
    if summary is None:
        flags = [
            spec.name, *variant.flags(spec.lr, spec.batch_size, spec.steps), *spec.extra_flags,
            "--seed", str(seed), "--out", str(out_dir), "--no-progress",
        ]
        args = build_parser().parse_args(flags)
        start = time.perf_counter()
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = args._module.run(args)
        seconds = time.perf_counter() - start
        if code != 0:
            raise RuntimeError(f"study run {spec.name}/{variant.name}/seed{seed} failed (exit {code}):\n"
                               f"bertopt {' '.join(flags)}\n{captured.getvalue()[-2000:]}")
        summary = _finished(out_dir)
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
