"""Run reports: ``metrics.jsonl`` (one JSON object per logged step), ``summary.json`` and plots.

Shared by ``bertopt pretrain`` and ``bertopt finetune``. The files of a run directory::

    <out>/metrics.jsonl   {"step": 10, "loss": 7.91, "lr": 1e-4, "grad_norm": 2.3, ...} per line
    <out>/summary.json    final numbers of the run (written atomically)
    <out>/loss.png        training loss (and held-out loss, when evaluated) against step
    <out>/lr.png          learning rate against step

matplotlib is imported inside :func:`plot_metrics` (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from bertopt.train.checkpoint import atomic_write_bytes


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become floats, NaN/inf become strings."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; "nan"/"inf" stay readable and parseable
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path``.

    ``resume_step=None`` starts a new file. ``resume_step=s`` keeps only the records with
    ``step <= s`` (a resumed run re-logs the steps after its checkpoint), so the file of an
    interrupted-and-resumed run reads like the file of an uninterrupted one. Event records (a
    rewind after a loss spike: ``{"event": "rewind", ...}``) are history and always kept.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []  # what the file holds
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self.records = read_metrics(self.path)
        self.rewind_to(resume_step or 0)

    def rewind_to(self, step: int) -> None:
        """Drop the records after ``step`` (except events): the run goes on from there."""
        if not self.enabled:
            return
        self.close()
        self.records = [r for r in self.records if r.get("step", 0) <= step or "event" in r]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = _jsonable(record)
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a crash loses at most the line being written

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file; a torn last line (crash mid-write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def finished_summary(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``summary.json`` of a run in ``out_dir`` that completed all its steps (not stopped by a
    signal), or None: no summary, an unreadable one, or an unfinished run."""
    try:
        summary = json.loads((Path(out_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("steps_completed") != summary.get("total_steps") or summary.get("stopped_by"):
        return None
    return summary


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write ``summary`` as indented JSON, atomically."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(_jsonable(summary), indent=2) + "\n").encode())
    return path


_TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "train_time_s")


def run_summary(records: list[dict[str, Any]], *, title: str, steps_completed: int, total_steps: int,
                stopped_by: str | None, resumed_from: int | None, last_eval: dict[str, float],
                final_fields: dict[str, Any], train_time: float, first_step_s: float | None, processes: int,
                checkpoint: Path | None, metrics: Path, run_info: dict[str, Any], plots: list[Path],
                extra: dict[str, Any], model_dir: Path | None, wall_time_s: float,
                rewinds: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The fields of ``summary.json``, from the run's metrics records and what the loop knows
    (``rewinds``: one entry per rewind after a loss spike, see :mod:`bertopt.train.spike`).
    ``last_eval`` empty (e.g. a finished run resumed): the last evaluation found in ``records``."""
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    at_start = next((r for r in records if r.get("step") == 0), {})
    if not last_eval:
        evaluated = [r for r in records if any(k not in _TRAIN_KEYS and k.startswith(("eval", "dev")) for k in r)]
        if evaluated:
            last_eval = {k: v for k, v in evaluated[-1].items() if k.startswith(("eval", "dev"))}
    return {
        "title": title, "steps_completed": steps_completed, "total_steps": total_steps,
        "stopped_by": stopped_by, "resumed_from": resumed_from,
        "first_logged_loss": losses[0] if losses else None, "last_logged_loss": losses[-1] if losses else None,
        **{f"{k}_at_start": v for k, v in at_start.items() if k not in ("step", "lr")},
        **last_eval, **final_fields,
        "train_time_s": round(train_time, 2),
        "first_step_s": round(first_step_s, 3) if first_step_s else None,
        "wall_time_s_this_process": round(wall_time_s, 2),
        "processes": processes,
        "rewinds": list(rewinds),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "metrics": str(metrics), "run": run_info,
        "plots": [str(p) for p in plots],
        **extra,
        "model_dir": str(model_dir) if model_dir else None,
        "wall_time_s": round(wall_time_s, 2),
    }


def _series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_metrics(
    records: list[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    title: str = "",
    eval_loss_key: str = "eval_loss",
    eval_metric_key: str | None = "eval_accuracy",
) -> list[Path]:
    """Draw ``loss.png`` (train loss, held-out loss and accuracy if present) and ``lr.png``.

    Returns the paths written. Keys missing from ``records`` are left out of the plots.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs, ys = _series(records, "loss")
    ax.plot(xs, ys, color="tab:blue", linewidth=1.2, label="train loss")
    ex, ey = _series(records, eval_loss_key)
    if ex:
        ax.plot(ex, ey, "o-", color="tab:orange", markersize=4, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if eval_metric_key:
        mx, my = _series(records, eval_metric_key)
        if mx:
            ax2 = ax.twinx()
            label = eval_metric_key.replace("eval_", "held-out ").replace("dev_", "dev ").replace("_", " ")
            ax2.plot(mx, my, "s--", color="tab:green", markersize=4, label=label)
            ax2.set_ylabel(label)
            ax2.set_ylim(bottom=0)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right")  # loss ends low, accuracy high: the middle is free
    ax.set_title(f"{title} loss".strip())
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    xs, ys = _series(records, "lr")
    ax.plot(xs, ys, color="tab:purple", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    ax.set_title(f"{title} learning rate".strip())
    fig.tight_layout()
    path = out_dir / "lr.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written
