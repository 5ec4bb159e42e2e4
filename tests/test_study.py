"""The study: statistics, and `bertopt study --quick` end to end (report structure, numbers
that come from the runs' own summary files)."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest

from bertopt.study.early_steps import analytic_ratio
from bertopt.study.stats import paired_difference, summarize
from bertopt.study.variants import BY_NAME, VARIANTS


def test_summary_and_paired_difference():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    # differences 0.1, 0.2, 0.3: mean 0.2, std 0.1, t(2) = 4.303 -> half width 0.2484
    d = paired_difference({0: 1.1, 1: 2.2, 2: 3.3}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert d.mean == pytest.approx(0.2) and d.std == pytest.approx(0.1)
    assert d.ci_low == pytest.approx(0.2 - 4.303 * 0.1 / math.sqrt(3))
    assert not d.distinguishable  # the interval contains 0
    tight = paired_difference({0: 1.1, 1: 2.1, 2: 3.1}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert tight.distinguishable and tight.ci_low > 0
    assert not paired_difference({0: 1.0}, {0: 0.0}).distinguishable  # one seed proves nothing


def test_analytic_bias_correction_ratio():
    assert analytic_ratio(1) == pytest.approx(0.1 / math.sqrt(0.001))
    peak = max(range(1, 200), key=analytic_ratio)
    assert 5 <= peak <= 15 and analytic_ratio(peak) > 6.5
    assert analytic_ratio(100_000) == pytest.approx(1.0, abs=1e-6)


def test_each_variant_changes_one_thing_from_the_recipe():
    base = BY_NAME["bert"]
    for v in VARIANTS:
        assert v.optim(1e-3).lr == 1e-3 * v.lr_multiplier
        assert v.batch_and_steps(32, 100)[1] == 100 // v.batch_multiplier
    assert BY_NAME["adamw"].optim(1e-3).bias_correction is True
    assert base.optim(1e-3).bias_correction is None  # the optimizer's own: off for BertAdam
    assert BY_NAME["adam_l2"].optim(1e-3).weight_decay_mode == "l2"


@pytest.mark.slow
def test_lr_sweep_picks_the_best_multiplier_from_its_runs(tmp_path):
    from bertopt.study import lr_sweep

    report = lr_sweep.sweep(tmp_path, seed=7, multipliers=[1.0, 10.0], tasks=("pretrain",), optimizer="lamb",
                            quick=True, log=lambda line: None)
    assert json.loads((tmp_path / "lr-sweep-lamb-pretrain.json").read_text()) == report
    base, big = report["sweeps"]
    assert (base["batch_multiplier"], big["batch_multiplier"]) == (1, 4)
    assert [r["multiplier"] for r in base["runs"]] == [1.0, 10.0]
    assert [r["multiplier"] for r in big["runs"]] == [2.0, 20.0]  # 2x the LR at 4x batch, as bert_4x
    for sweep in (base, big):
        for run in sweep["runs"]:  # the numbers are those of the runs on disk
            name = f"lamb{'_4x' if sweep['batch_multiplier'] == 4 else ''}_lrx{run['multiplier']:g}"
            summary = json.loads((tmp_path / "runs" / "pretrain" / name / "seed7" / "summary.json").read_text())
            assert summary["eval_loss"] == run["eval_loss"] and summary["run"]["lr"] == pytest.approx(run["lr"])
        assert sweep["best_multiplier"] == min(sweep["runs"], key=lambda r: r["eval_loss"])["multiplier"]


def _table_rows(report: str, heading: str) -> dict[str, list[str]]:
    """The first Markdown table after ``heading``: variant -> cells."""
    section = report.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


@pytest.mark.slow
def test_quick_study_report_comes_from_its_runs(tmp_path):
    from bertopt.cli import main

    out = tmp_path / "study"
    assert main(["study", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    n_runs = sum(1 for _ in (out / "runs").glob("*/*/seed*"))
    assert re.search(rf"\b{n_runs} runs taking [\d.]+ min of training", report)
    for heading in ("## MLM pretraining (quick)", "## Fine-tuning MiniLM on Rotten Tomatoes (quick)",
                    "## Early steps: bias correction under warmup", "## Claims"):
        assert heading in report
    for png in ("curves-pretrain.png", "curves-finetune.png", "early-steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    # the results table: every variant, and its mean ± std recomputed from summary.json files
    for task, heading, key in (("pretrain", "## MLM pretraining (quick)", "eval_loss"),
                               ("finetune", "## Fine-tuning MiniLM on Rotten Tomatoes (quick)", "test_accuracy")):
        rows = _table_rows(report, heading)
        run_dirs = sorted((out / "runs" / task).iterdir())
        assert {d.name for d in run_dirs} == set(rows)
        for variant_dir in run_dirs:
            values = [json.loads((seed_dir / "summary.json").read_text())[key] for seed_dir in sorted(variant_dir.iterdir())]
            assert len(values) == 2
            mean, std = statistics.fmean(values), statistics.stdev(values)
            assert rows[variant_dir.name][0] == f"{mean:.4f} ± {std:.4f}"

    # the claims table names a verdict for each claim it could test
    claims = [line for line in report.split("## Claims", 1)[1].splitlines() if re.match(r"\| \d \|", line)]
    assert len(claims) >= 8
    assert all(re.search(r"(variant better|baseline better|not distinguishable) \|$", line) for line in claims)
