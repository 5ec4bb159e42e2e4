"""metrics.jsonl, summary.json and plots."""

from __future__ import annotations

import json
import math

from bertopt.train.report import MetricsLog, plot_metrics, read_metrics, write_summary


def test_metrics_log_appends_and_resume_truncates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in (10, 20, 30):
            log.append({"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": float("nan")})
    records = read_metrics(path)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[0]["grad_norm"] == "nan"  # JSON has no NaN literal
    with MetricsLog(path, resume_step=20) as log:  # resuming from a checkpoint of step 20
        log.append({"step": 30, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(10, 0.1), (20, 0.05), (30, 0.5)]
    MetricsLog(path).close()  # a fresh run starts an empty file
    assert read_metrics(path) == []


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]


def test_summary_and_plots(tmp_path):
    records = [{"step": s, "loss": 5 - s / 10, "lr": s / 100, "grad_norm": 1.0} for s in range(1, 21)]
    records[9].update(eval_loss=4.2, eval_accuracy=0.1)
    records[19].update(eval_loss=3.5, eval_accuracy=0.2)
    paths = plot_metrics(records, tmp_path, title="toy")
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    write_summary(tmp_path / "summary.json", {"loss": math.inf, "plots": paths})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"loss": "inf", "plots": [str(p) for p in paths]}
