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
from bertopt.study.variants import BY_NAME


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
    base = BY_NAME["bert"].optim(1e-3)
    assert (base.lr, base.bias_correction, base.weight_decay, base.weight_decay_mode) == (1e-3, None, 0.01, "decoupled")
    changed = {name: {k for k, v in vars(BY_NAME[name].optim(1e-3)).items() if v != getattr(base, k)} for name in BY_NAME}
    assert changed == {"bert": set(), "adamw": {"bias_correction"}, "adam": {"bias_correction", "weight_decay"},
                       "lamb": {"optimizer"}, "adam_l2": {"weight_decay_mode"}, "bert_wd0.1": {"weight_decay"},
                       "adam_l2_wd0.1": {"weight_decay_mode", "weight_decay"}}


def test_t_interval_for_ten_and_twenty_seeds():
    ten = paired_difference({k: float(k % 2) for k in range(10)}, {k: 0.0 for k in range(10)})
    assert ten.ci_high - ten.mean == pytest.approx(2.262 * statistics.stdev([k % 2 for k in range(10)]) / math.sqrt(10))
    twenty = paired_difference({k: float(k % 2) for k in range(20)}, {k: 0.0 for k in range(20)})
    assert twenty.ci_high - twenty.mean == pytest.approx(2.093 * statistics.stdev([k % 2 for k in range(20)]) / math.sqrt(20))


def test_band_verdict_places_the_interval_against_half_a_point():
    from bertopt.study.report import band_verdict
    from bertopt.study.stats import PairedDifference

    assert band_verdict(PairedDifference(10, 0.001, 0.003, -0.002, 0.004), 0.005).startswith("inside")
    assert band_verdict(PairedDifference(10, 0.02, 0.01, 0.012, 0.028), 0.005).startswith("outside")
    assert band_verdict(PairedDifference(10, -0.02, 0.01, -0.028, -0.012), 0.005).startswith("outside")
    assert band_verdict(PairedDifference(10, 0.004, 0.01, -0.003, 0.011), 0.005).startswith("neither")


def test_run_lock_is_exclusive_between_processes_and_dropped_when_its_holder_dies(tmp_path):
    import subprocess
    import sys

    from bertopt.study.grid import _Lock

    mine = _Lock(tmp_path / "seed0")
    assert mine.acquire()
    assert not _Lock(tmp_path / "seed0").acquire()  # a second holder, even in this process: no
    mine.release()
    # another process holds it: not ours to take; once that process is killed, it is free
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(mine.path)],
        stdout=subprocess.PIPE, text=True)
    import threading

    waiter, got = _Lock(tmp_path / "seed0"), []
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert not _Lock(tmp_path / "seed0").acquire()
        assert _Lock(tmp_path / "seed0").held() and not _Lock(tmp_path / "seed1").held()
        # a process that must wait blocks on the lock and has it the moment the holder is gone
        thread = threading.Thread(target=lambda: got.append(waiter.acquire(block=True)), daemon=True)
        thread.start()
        thread.join(0.5)
        assert got == []
    finally:
        holder.kill()
        holder.wait()
    thread.join(10)
    assert got == [True]
    assert _Lock(tmp_path / "seed0").held()  # by the waiter now
    waiter.release()
    assert not _Lock(tmp_path / "seed0").held()
    assert mine.acquire()
    mine.release()


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
def test_quick_study_report_comes_from_its_runs(tmp_path, capsys):
    """Two processes share the study, as the --out help says to use two cores: a second
    `bertopt study --no-report` on the same directory, and this one, which writes the report."""
    import subprocess
    import sys

    from bertopt.cli import main
    from bertopt.study.command import task_specs

    out = tmp_path / "study"
    claims_path = tmp_path / "claims.json"
    with open(tmp_path / "helper.out", "w") as stdout, open(tmp_path / "helper.err", "w") as stderr:
        helper = subprocess.Popen([sys.executable, "-m", "bertopt", "study", "--quick", "--out", str(out),
                                   "--no-report"], stdout=stdout, stderr=stderr)
    try:
        assert main(["study", "--quick", "--out", str(out), "--claims-json", str(claims_path)]) == 0
        helper.wait(timeout=600)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    helper_out, helper_err = (tmp_path / "helper.out").read_text(), (tmp_path / "helper.err").read_text()
    assert helper.returncode == 0, helper_err
    report = (out / "report.md").read_text()
    specs = {s.key: s for s in task_specs(quick=True)}
    n_runs = sum(1 for d in out.glob("*/*/*/seed*") if d.is_dir())

    def trained(log):  # the runs a process trained itself: "  <part>/<variant>/seed<n>   lr ..."
        return re.findall(r"^  (\S+/seed\d+)\s+lr ", log, flags=re.M)

    mine, theirs = trained(capsys.readouterr().out), trained(helper_out)
    assert mine and theirs and not set(mine) & set(theirs)  # each run trained once, by one of them
    assert len(mine) + len(theirs) == n_runs
    assert re.search(rf"\b{n_runs} runs \(8 of them LR sweeps\) taking [\d.]+ min of training", report)
    for spec in specs.values():
        assert f"## {spec.title}" in report
    for png in ("curves-finetune.png", "curves-few_sample.png", "curves-few_sample_lr1e-4.png", "curves-large_batch.png",
                "curves-decay.png", "early-steps.png", "differences.png", "few-sample.png", "few-sample-lr1e-4.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in report

    def summaries(part, variant):  # in seed order
        dirs = sorted((out / "runs" / part / variant).glob("seed*[0-9]"), key=lambda d: int(d.name[len("seed"):]))
        return [json.loads((d / "summary.json").read_text()) for d in dirs]

    # each results table: every variant, its mean ± std recomputed from the summary.json files
    for spec in specs.values():
        rows = _table_rows(report.split(f"## {spec.title}", 1)[1], "| variant | lr | seeds |")
        assert set(rows) == set(spec.variants) == {d.name for d in (out / "runs" / spec.key).iterdir()}
        key = spec.metrics[0].key
        for variant in spec.variants:
            values = [s[key] for s in summaries(spec.key, variant)]
            assert len(values) == spec.seeds
            assert rows[variant][2] == f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"

    claims = json.loads(claims_path.read_text())
    # the sweep's choice is the best dev metric among its runs on disk; the variants used that LR
    for sweep in claims["sweeps"]:
        spec = specs[sweep["task"]]
        metric = spec.sweep_metric
        for run in sweep["runs"]:
            summary = json.loads((out / "sweeps" / spec.key / f"{sweep['variant']}_lr{run['lr']:g}" / "seed100"
                                  / "summary.json").read_text())
            assert summary[metric.key] == run[metric.key] and summary["run"]["lr"] == run["lr"]
        best = (max if metric.higher_is_better else min)(sweep["runs"], key=lambda r: r[metric.key])
        assert sweep["chosen_lr"] == best["lr"]
        users = [sweep["variant"]] + [v for v, src in spec.lr_from.items() if src == sweep["variant"]]
        assert {s["run"]["lr"] for v in users for s in summaries(spec.key, v)} == {best["lr"]}

    # the claims JSON has the issue's shape, and its numbers are the runs'
    assert {c["task"] for c in claims["comparisons"]} == {"finetune", "few_sample", "few_sample_lr1e-4", "large_batch",
                                                               "decay"}
    for c in claims["comparisons"]:
        assert {"claim", "task", "variant", "baseline", "metric", "seeds", "mean_diff", "ci95", "verdict"} <= set(c)
        pairs = list(zip(summaries(c["task"], c["variant"]), summaries(c["task"], c["baseline"])))
        assert all(a["run"]["seed"] == b["run"]["seed"] for a, b in pairs)
        diffs = [a[c["metric"]] - b[c["metric"]] for a, b in pairs]
        assert c["seeds"] == len(diffs) and c["mean_diff"] == pytest.approx(statistics.fmean(diffs))
        assert c["ci95"][0] <= c["mean_diff"] <= c["ci95"][1]
        assert re.match(r"(variant better|baseline better|not distinguishable)", c["verdict"])
        if c["task"].startswith(("finetune", "few_sample")):
            assert re.search(r"; (inside|outside|neither)", c["verdict"])
    for arm in claims["few_sample"]:
        runs = summaries(arm["part"], arm["arm"])
        failed = sum(s["dev_accuracy"] <= s["run"]["majority_accuracy"]["dev"] for s in runs)
        assert (arm["runs"], arm["failed_runs"], arm["train_examples"]) == (len(runs), failed, 16)
        assert arm["mean_dev_accuracy"] == pytest.approx(statistics.fmean(s["dev_accuracy"] for s in runs))
        assert arm["failure_rule"]
    assert {(row["variant"], row["batch_size"], row["seeds"]) for row in claims["large_batch"]} == {
        ("bert", 32, 2), ("lamb", 32, 2)}
    for row in claims["large_batch"]:
        assert row["heldout_loss_mean"] == pytest.approx(
            statistics.fmean(s["eval_loss"] for s in summaries("large_batch", row["variant"])))
        assert all(s["run"]["grad_accum_steps"] == 4 for s in summaries("large_batch", row["variant"]))

    # the claims table names a verdict for each comparison
    table = [line for line in report.split("## Claims", 1)[1].splitlines() if re.match(r"\| \d \|", line)]
    assert len(table) == len(claims["comparisons"]) == 7
    assert {(arm["part"], arm["arm"]) for arm in claims["few_sample"]} == {
        (part, arm) for part in ("few_sample", "few_sample_lr1e-4") for arm in ("bert", "adamw")}

    # a second invocation reuses every finished run and writes the same numbers, also runs that have
    # no study-config.json (started by hand): their summary.json is checked instead
    for run in ("decay/bert/seed0", "finetune/adamw/seed1"):
        (out / "runs" / run / "study-config.json").unlink()
    assert main(["study", "--quick", "--out", str(out), "--claims-json", str(claims_path)]) == 0
    again = json.loads(claims_path.read_text())
    assert again["comparisons"] == claims["comparisons"] and again["few_sample"] == claims["few_sample"]

    # a finished run whose settings differ from what the study asks for is not silently reused
    saved = out / "runs" / "decay" / "adam_l2" / "seed1" / "study-config.json"
    edited = json.loads(saved.read_text())
    edited["optim"]["weight_decay_mode"] = "decoupled"
    saved.write_text(json.dumps(edited))
    assert main(["study", "--quick", "--out", str(out), "--parts", "decay"]) == 2
    assert "optim.weight_decay_mode" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_the_study_and_the_same_command_finishes_it(tmp_path):
    """SIGTERM mid-study: exit 143 with a message saying how to continue (not 'a bug'), no lock
    left behind; the same command then finishes every run and reuses those already finished."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "study"
    argv = [sys.executable, "-m", "bertopt", "study", "--quick", "--parts", "decay", "--out", str(out), "--no-report"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "runs" / "decay" / "bert" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "run the same command again" in err and "bug" not in err
    from bertopt.study.grid import _Lock

    for lock in out.rglob("*.lock"):  # none is still held
        probe = _Lock(lock.with_suffix(""))
        assert probe.acquire()
        probe.release()
    from bertopt.train.report import finished_summary

    # an interrupted run writes a summary too (stopped_by): only completed ones count as finished
    finished_before = {p.parent for p in out.rglob("summary.json") if finished_summary(p.parent) is not None}

    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = sorted(d for d in (out / "runs" / "decay").glob("*/seed*") if d.is_dir())
    assert len(runs) == 8 and all(json.loads((r / "summary.json").read_text())["steps_completed"] == 12 for r in runs)
    for line in done.stdout.splitlines():  # a run finished before the stop was not trained again
        assert not any(f"decay/{d.parent.name}/{d.name} " in line for d in finished_before if d.parent.parent.name == "decay")


def test_a_diverged_run_is_recorded_as_a_result_and_not_trained_again(tmp_path, monkeypatch):
    from bertopt.study import grid
    from bertopt.study.command import task_specs
    from bertopt.study.report import RunRecord, is_failed, verdict
    from bertopt.train import command
    from bertopt.train.job import NonFiniteLoss, TrainingError

    calls = []

    def diverging_run(name, config):
        calls.append(config.optim.lr)
        raise NonFiniteLoss("the training loss is nan at step 3; this update was not applied")

    monkeypatch.setattr(command, "train", diverging_run)
    spec = next(s for s in task_specs(quick=True) if s.key == "decay")
    first = grid.run_one(spec, BY_NAME["bert"], 0, 1e-3, tmp_path / "bert" / "seed0", log=lambda line: None)
    assert math.isnan(first.summary["eval_loss"]) and "nan at step 3" in first.summary["diverged"]
    again = grid.run_one(spec, BY_NAME["bert"], 0, 1e-3, tmp_path / "bert" / "seed0", log=lambda line: None)
    assert calls == [1e-3] and math.isnan(again.summary["eval_loss"])
    # a diverged LR loses the sweep to any finite result, whichever way the metric points
    for metric in (spec.metrics[0], spec.metrics[1]):
        assert grid._goodness(math.nan, metric) < grid._goodness(1e9 if not metric.higher_is_better else -1e9, metric)
    # it shows as NaN in the statistics and decides nothing
    nan_diff = paired_difference({0: math.nan, 1: 1.0}, {0: 0.0, 1: 0.0})
    assert verdict(nan_diff, higher_is_better=False).startswith("undecided")
    # a diverged few-sample run is a failed run
    run = RunRecord("few_sample", "bert", 0, 1e-3, {"dev_accuracy": math.nan, "run": {"majority_accuracy": {"dev": 0.58}}},
                    [], [], 0.0)
    assert is_failed(run)

    # any other failure stops the study with what the run said (not as "a bug in bertopt"), even one
    # whose message mentions a non-finite value: the study decides by the error's class
    def failing_run(name, config):
        raise TrainingError("could not write the checkpoint (non-finite disk)")

    monkeypatch.setattr(command, "train", failing_run)
    with pytest.raises(grid.StudyError, match=r"could not write the checkpoint \(non-finite disk\)"):
        grid.run_one(spec, BY_NAME["bert"], 1, 1e-3, tmp_path / "bert" / "seed1", log=lambda line: None)


def test_report_only_trains_nothing_and_leaves_out_unfinished_parts(tmp_path, capsys):
    from bertopt.cli import main

    out = tmp_path / "study"
    assert main(["study", "--quick", "--parts", "decay", "large_batch", "--out", str(out), "--report-only"]) == 0
    assert not (out / "runs").exists() and not (out / "sweeps").exists()
    printed = capsys.readouterr().out
    assert "0 of 8 runs have finished" in printed and "its LR sweep has not finished" in printed
    claims = json.loads((out / "study-claims.json").read_text())
    assert claims["comparisons"] == [] and claims["large_batch"] == []
    assert "## Decoupled decay vs L2 (quick)" in (out / "report.md").read_text()


def test_a_run_whose_holder_has_not_written_its_settings_is_not_read_yet(tmp_path):
    """Between a run's summary.json and its study-config.json, another process must not take the
    run as finished (it would check the summary alone): --report-only leaves it out, a training
    study waits for the lock. A hand-made run (no settings file, no holder) is read."""
    import subprocess
    import sys

    from bertopt.study.command import task_specs
    from bertopt.study.grid import SETTINGS, _Lock, run_one
    from bertopt.study.variants import BY_NAME

    spec = next(s for s in task_specs(quick=True) if s.key == "decay")
    run = tmp_path / "runs" / "decay" / "bert" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "steps_completed": spec.steps, "total_steps": spec.steps, "stopped_by": None, "eval_loss": 7.0,
        "eval_accuracy": 0.1, "run": {**BY_NAME["bert"].optim(spec.lr).settings(), "seed": 0,
                                      "batch_size": spec.batch_size}}))
    lines = []

    def read(**kw):
        return run_one(spec, BY_NAME["bert"], 0, spec.lr, run, log=lines.append, **kw)

    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"), str(_Lock(run).path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert read(train=False) is None  # held, no settings yet: not finished
        assert read(wait=False) is None  # a training study skips it for now
        assert not (run / SETTINGS).exists() and lines == []
    finally:
        holder.kill()
        holder.wait()
    record = read(train=False)  # nobody holds it: a hand-made run, checked by its summary
    assert record is not None and record.summary["eval_loss"] == 7.0
    assert read(wait=False).summary["eval_loss"] == 7.0 and not (run / SETTINGS).exists()


def test_a_part_is_checked_against_the_typed_configs_when_declared():
    """Every part of the study (quick and full) builds valid configs; a setting the configs do not
    have, or a value out of range, is refused when the part is declared, naming the part."""
    import dataclasses

    from bertopt.study.command import task_specs

    specs = task_specs(quick=True) + task_specs(quick=False)
    assert len(specs) == 10
    decay = next(s for s in specs if s.key == "decay")
    with pytest.raises(ValueError, match=r"study part 'decay': .*seq_lenn"):
        dataclasses.replace(decay, settings={**decay.settings, "seq_lenn": 32})
    with pytest.raises(ValueError, match=r"study part 'decay': --seq-len must be between 8 and 512"):
        dataclasses.replace(decay, settings={**decay.settings, "seq_len": 4})
    with pytest.raises(ValueError, match=r"study part 'decay': --log-every must be >= 1"):
        dataclasses.replace(decay, settings={**decay.settings, "run": {"log_every": 0}})
