"""The study's Markdown report, its claims JSON and its plots, computed only from the runs' own files."""

from __future__ import annotations

import json
import math
import os
import platform
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bertopt.study.early_steps import EarlyStep
from bertopt.study.grid import RunRecord, SweepResult, TaskSpec
from bertopt.study.stats import PairedDifference, paired_difference, summarize
from bertopt.study.variants import Variant

POINT = 0.01  # accuracies are fractions; "half a point" is 0.005


@dataclass(frozen=True)
class Comparison:
    claim: int
    statement: str
    task: str  # a part's key
    variant: str
    baseline: str
    margin: float | None = None  # an equivalence band: is the 95% interval inside +-margin, outside, or neither?


COMPARISONS = (
    Comparison(2, "With warmup, bias correction can be dropped without harm", "finetune", "adamw", "bert", 0.5 * POINT),
    Comparison(4, "Fine-tuning with BERT's optimizer gains a little (under half a point) over plain Adam",
               "finetune", "adam", "bert", 0.5 * POINT),
    Comparison(2, "With warmup, bias correction can be dropped without harm (1,000 examples)", "few_sample",
               "adamw", "bert", 0.5 * POINT),
    Comparison(2, "With warmup, bias correction can be dropped without harm (1,000 examples, lr 1e-4)",
               "few_sample_lr1e-4", "adamw", "bert", 0.5 * POINT),
    Comparison(5, "LAMB matters only at large batch (batch 1,024, each at its own LR)", "large_batch", "lamb", "bert"),
    Comparison(1, "With Adam, decoupled weight decay beats L2 in the loss (decay 0.01)", "decay", "adam_l2", "bert"),
    Comparison(1, "With Adam, decoupled weight decay beats L2 in the loss (decay 0.1)", "decay", "adam_l2_wd0.1",
               "bert_wd0.1"),
)

FAILURE_RULE = ("dev accuracy at or below the majority-class rate of the dev split (what always predicting the "
                "most frequent label scores); fixed before the runs")


def _by(records: list[RunRecord]) -> dict[tuple[str, str], dict[int, RunRecord]]:
    table: dict[tuple[str, str], dict[int, RunRecord]] = defaultdict(dict)
    for r in records:
        table[(r.task, r.variant)][r.seed] = r
    return table


def _values(runs: dict[int, RunRecord], key: str) -> dict[int, float]:
    """Per seed; a diverged run counts as NaN (shown, not averaged away)."""
    return {seed: float(r.summary[key]) for seed, r in runs.items() if key in r.summary}


def paired_differences(specs: list[TaskSpec], table) -> dict[tuple[Comparison, str], PairedDifference]:
    """Each comparison's paired difference by seed, per metric of its part (where both arms have runs)."""
    diffs = {}
    for spec in specs:
        for c in COMPARISONS:
            if c.task == spec.key and (c.task, c.variant) in table and (c.task, c.baseline) in table:
                for m in spec.metrics:
                    diffs[(c, m.key)] = paired_difference(_values(table[(c.task, c.variant)], m.key),
                                                          _values(table[(c.task, c.baseline)], m.key))
    return diffs


def verdict(diff: PairedDifference, higher_is_better: bool) -> str:
    """'variant better' / 'baseline better' / 'not distinguishable' from the 95% interval."""
    if math.isnan(diff.mean):
        return "undecided: a run diverged"
    if not diff.distinguishable:
        return "not distinguishable"
    return "variant better" if (diff.mean > 0) == higher_is_better else "baseline better"


def band_verdict(diff: PairedDifference, margin: float) -> str:
    """Where the 95% interval lies against the band +-margin."""
    if math.isnan(diff.mean):
        return "no interval (a run diverged)"
    if -margin <= diff.ci_low and diff.ci_high <= margin:
        return f"inside ±{margin / POINT:g} points"
    if diff.ci_low > margin or diff.ci_high < -margin:
        return f"outside ±{margin / POINT:g} points"
    return f"neither (the interval crosses ±{margin / POINT:g} points)"


def is_failed(run: RunRecord) -> bool:
    """The few-sample failure rule (:data:`FAILURE_RULE`)."""
    accuracy = float(run.summary["dev_accuracy"])
    return not math.isfinite(accuracy) or accuracy <= run.summary["run"]["majority_accuracy"]["dev"] + 1e-12


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[RunRecord], spec: TaskSpec, path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in spec.variants:
        runs = [r for r in records if r.task == spec.key and r.variant == variant]
        if not runs:
            continue
        steps = sorted({s for r in runs for s, _ in r.curve})
        mean = [sum(dict(r.curve).get(s, float("nan")) for r in runs) / len(runs) for s in steps]
        line, = ax_loss.plot(steps, mean, label=variant, linewidth=1.4)
        ax_lr.plot(*zip(*runs[0].lr_curve), color=line.get_color(), label=variant, linewidth=1.2)
    ax_loss.set(title=f"{spec.title}: training loss (mean over seeds)", xlabel="step", ylabel="loss")
    ax_lr.set(title="learning rate used", xlabel="step", ylabel="lr")
    return _save(fig, (ax_loss, ax_lr), path)


def plot_differences(rows: list[tuple[Comparison, PairedDifference, str]], path: Path) -> Path:
    """Each comparison's paired difference with its 95% interval; accuracies in points with the +-0.5 band."""
    plt = _pyplot()
    acc = [r for r in rows if r[0].margin is not None]
    loss = [r for r in rows if r[0].margin is None]
    panels = [p for p in (acc, loss) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.6 * max(map(len, panels)) + 1.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        scale = 1 / POINT if panel is acc else 1.0
        for y, (c, d, _) in enumerate(panel):
            ax.errorbar(d.mean * scale, y, xerr=[[(d.mean - d.ci_low) * scale], [(d.ci_high - d.mean) * scale]],
                        fmt="o", capsize=4, color="C0")
        ax.axvline(0, color="black", linewidth=0.8)
        if panel is acc:
            ax.axvspan(-0.5, 0.5, color="C2", alpha=0.15, label="±0.5 points")
        ax.set_yticks(range(len(panel)), [f"{c.task}: {c.variant} − {c.baseline}" for c, _, _ in panel])
        ax.set(xlabel=("accuracy difference (points)" if panel is acc else "held-out MLM loss difference"),
               title="paired differences, 95% intervals" + (" (higher = variant better)" if panel is acc
                                                            else " (lower = variant better)"))
        ax.invert_yaxis()
    return _save(fig, axes[0], path)


def plot_few_sample(runs_by_arm: dict[str, list[RunRecord]], title: str, path: Path) -> Path:
    import random

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    jitter = random.Random(0)
    for x, (arm, runs) in enumerate(runs_by_arm.items()):
        acc = [r.summary["dev_accuracy"] for r in runs]
        colors = ["C3" if is_failed(r) else "C0" for r in runs]
        ax.scatter([x + jitter.uniform(-0.12, 0.12) for _ in acc], acc, c=colors, s=22)
        ax.boxplot(acc, positions=[x], widths=0.45, showfliers=False)
    majority = next(iter(runs_by_arm.values()))[0].summary["run"]["majority_accuracy"]["dev"]
    ax.axhline(majority, color="C3", linestyle="--", linewidth=1, label=f"majority class ({majority:.3f}): failed at or below")
    ax.set_xticks(range(len(runs_by_arm)), list(runs_by_arm))
    ax.set(ylabel="dev accuracy", title=f"{title}: one point per run")
    return _save(fig, (ax,), path)


def plot_early_steps(records: list[EarlyStep], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_ratio, ax_delta) = plt.subplots(1, 2, figsize=(12, 4.2))
    t = [r.step for r in records]
    ax_ratio.plot(t, [r.ratio_analytic for r in records], label="analytic (1-b1^t)/sqrt(1-b2^t)")
    ax_ratio.plot(t, [r.ratio_measured for r in records], label="measured ||u|| without / with correction")
    ax_ratio.set(title="update direction: no bias correction vs bias correction", xlabel="update t", ylabel="ratio")
    ax_delta.plot(t, [r.delta_bert for r in records], label="BertAdam (no correction)")
    ax_delta.plot(t, [r.delta_adamw for r in records], label="AdamW (correction)")
    ax_delta.set(title="actual step size ||Δθ|| under warmup", xlabel="update t", ylabel="||Δθ||")
    return _save(fig, (ax_ratio, ax_delta), path)


def _versions() -> str:
    import torch

    import bertopt

    parts = [f"bertopt {bertopt.__version__}", f"torch {torch.__version__}", f"Python {platform.python_version()}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def _settings_text(settings: dict) -> str:
    flat = {**{k: v for k, v in settings.items() if k != "run"}, **settings.get("run", {})}
    return ", ".join(f"{k}={v}" for k, v in flat.items())


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _part_section(spec: TaskSpec, table, diffs, records: list[RunRecord], sweeps: list[SweepResult], out: Path) -> list[str]:
    lines = ["", f"## {spec.title}", "",
             f"`bertopt {spec.command}`, batch {spec.batch_size}, "
             + (f"{spec.steps} steps" if spec.steps else "steps from the epochs setting")
             + f", settings `{_settings_text(spec.settings)}`.", ""]
    own = [s for s in sweeps if s.task == spec.key]
    if own:
        lines += [f"Learning rate per optimizer, chosen by {own[0].metric.label} on seed {own[0].to_json()['seed']} "
                  "(not a seed of the comparison); each cell is lr: metric:", "",
                  "| variant | " + " | ".join(f"run {i + 1}" for i in range(max(len(s.runs) for s in own))) + " | chosen |",
                  "|---|" + "---|" * (max(len(s.runs) for s in own) + 1)]
        for s in own:
            edge = " (edge of the range)" if s.chosen_lr in (min(r.lr for r in s.runs), max(r.lr for r in s.runs)) else ""
            lines.append(f"| `{s.variant}` | " + " | ".join(f"{_fmt(r.lr)}: {float(r.summary[s.metric.key]):.4f}"
                                                              for r in s.runs) + f" | {_fmt(s.chosen_lr)}{edge} |")
        if spec.lr_from:
            lines += ["", "; ".join(f"`{v}` uses `{src}`'s LR" for v, src in spec.lr_from.items()) + "."]
        lines.append("")
    header = "| variant | lr | seeds | " + " | ".join(m.label for m in spec.metrics) + " | s/run |"
    lines += [header, "|" + "---|" * (len(spec.metrics) + 4)]
    for name in spec.variants:
        runs = table.get((spec.key, name), {})
        if not runs:
            continue
        cells = [str(summarize(list(_values(runs, m.key).values()))) for m in spec.metrics]
        lrs = sorted({r.lr for r in runs.values()})
        seconds = summarize([r.seconds for r in runs.values()]).mean
        lines.append(f"| `{name}` | {', '.join(map(_fmt, lrs))} | {len(runs)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    pairs = [c for c in COMPARISONS if (c, spec.metrics[0].key) in diffs and c.task == spec.key]
    if pairs:
        lines += ["", "Paired differences by seed (variant − baseline): mean ± std [95% t-interval]:", "",
                  "| variant − baseline | " + " | ".join(m.label for m in spec.metrics) + " |",
                  "|" + "---|" * (len(spec.metrics) + 1)]
        for c in pairs:
            cells = [f"{diffs[(c, m.key)]} {verdict(diffs[(c, m.key)], m.higher_is_better)}" for m in spec.metrics]
            lines.append(f"| `{c.variant}` − `{c.baseline}` | " + " | ".join(cells) + " |")
    png = plot_curves(records, spec, out / f"curves-{spec.key}.png")
    lines += ["", f"![{spec.title}: loss curves and learning rates]({png.name})"]
    return lines


def few_sample_results(spec: TaskSpec, table) -> list[dict]:
    results = []
    for arm in spec.variants:
        runs = list(table.get((spec.key, arm), {}).values())
        if not runs:
            continue
        acc = summarize([r.summary["dev_accuracy"] for r in runs])
        results.append({"part": spec.key, "arm": arm, "train_examples": runs[0].summary["run"]["split_sizes"]["train"],
                        "epochs": spec.settings.get("epochs"), "lr": runs[0].lr, "runs": len(runs),
                        "failed_runs": sum(map(is_failed, runs)), "failure_rule": FAILURE_RULE,
                        "majority_dev_accuracy": runs[0].summary["run"]["majority_accuracy"]["dev"],
                        "mean_dev_accuracy": acc.mean, "std": acc.std,
                        "min_dev_accuracy": min(r.summary["dev_accuracy"] for r in runs),
                        "mean_test_accuracy": summarize([r.summary["test_accuracy"] for r in runs]).mean})
    return results


def _few_sample_section(spec: TaskSpec, table, results: list[dict], out: Path) -> list[str]:
    if not results:
        return []
    lines = ["", "### Failed runs", "", f"Failure rule: {FAILURE_RULE}.", "",
              "| arm | train examples | epochs | lr | runs | failed | mean dev accuracy ± std | lowest | mean test accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in results:
        lines.append(f"| `{f['arm']}` | {f['train_examples']} | {f['epochs']:g} | {_fmt(f['lr'])} | {f['runs']} | "
                     f"{f['failed_runs']} | {f['mean_dev_accuracy']:.4f} ± {f['std']:.4f} | {f['min_dev_accuracy']:.4f} | "
                     f"{f['mean_test_accuracy']:.4f} |")
    png = plot_few_sample({a: list(table[(spec.key, a)].values()) for a in spec.variants if (spec.key, a) in table},
                          f"few-sample fine-tuning at lr {_fmt(spec.lr)}", out / f"{spec.key.replace('_', '-')}.png")
    lines += ["", f"![few-sample dev accuracy per run]({png.name})"]
    return lines


def write_report(out: Path, specs: list[TaskSpec], variants: dict[str, Variant], records: list[RunRecord],
                 sweeps: list[SweepResult], early: list[EarlyStep], *, command: str, wall_seconds: float,
                 claims_json: Path | None = None) -> Path:
    table = _by(records)
    diffs = paired_differences(specs, table)
    all_runs = len(records) + sum(len(s.runs) for s in sweeps)
    minutes = (sum(r.seconds for r in records) + sum(r.seconds for s in sweeps for r in s.runs)) / 60
    lines = [
        "# bertopt study: BERT's optimizer recipe, claim by claim",
        "",
        f"Command: `{command}`  ",
        f"Versions: {_versions()}; {os.cpu_count()} CPU cores.  ",
        f"{all_runs} runs ({sum(len(s.runs) for s in sweeps)} of them LR sweeps) taking {minutes:.1f} min of training "
        f"(each run's own wall time, one thread each); this invocation {wall_seconds / 60:.1f} min (finished runs are reused).",
        "",
        "Every variant is the BERT recipe (BertAdam: no bias correction, decoupled weight decay 0.01 "
        "except LayerNorm/bias, global clip 1.0, 10% linear warmup, Google's linear decay) with one "
        "thing changed. Runs with the same seed share initialisation and data order, so differences are "
        "paired by seed: mean ± std [95% t-interval]; *not distinguishable* means the interval contains 0.",
        "",
        "| variant | what changes |",
        "|---|---|",
    ]
    used = [v for v in variants.values() if any(v.name in s.variants for s in specs)]
    lines += [f"| `{v.name}` | {v.label} |" for v in used]
    few_results = []
    for spec in specs:
        lines += _part_section(spec, table, diffs, records, sweeps, out)
        if spec.failure_table:
            results = few_sample_results(spec, table)
            lines += _few_sample_section(spec, table, results, out)
            few_results += results

    lines += ["", "## Early steps: bias correction under warmup", "",
              "Two pretraining runs from the same initialisation on the same batches, BertAdam without and "
              "with bias correction (dropout off so both see the same forward pass). `ratio measured` is the "
              "norm of the Adam direction each run applied, uncorrected / corrected; eps=1e-6 pulls it below "
              "the analytic value wherever |g| is not much larger than eps/sqrt(1-b2^t).", "",
              "| t | lr | ratio analytic | ratio measured | ‖Δθ‖ BertAdam | ‖Δθ‖ AdamW |", "|---|---|---|---|---|---|"]
    shown = sorted({1, 2, 3, 5, 10, 20, len(early) // 2, len(early)} & set(range(1, len(early) + 1)))
    for r in (early[t - 1] for t in shown):
        lines.append(f"| {r.step} | {r.lr:.2e} | {r.ratio_analytic:.3f} | {r.ratio_measured:.3f} | "
                     f"{r.delta_bert:.4f} | {r.delta_adamw:.4f} |")
    if early:
        png = plot_early_steps(early, out / "early-steps.png")
        lines += ["", f"![update size with and without bias correction]({png.name})"]

    comparisons, rows = [], []
    by_key = {s.key: s for s in specs}
    lines += ["", "## Claims", "",
              "| # | claim | part | metric | seeds | variant − baseline | verdict |", "|---|---|---|---|---|---|---|"]
    for c in COMPARISONS:
        spec = by_key.get(c.task)
        if spec is None or (c, spec.metrics[0].key) not in diffs:
            continue
        metric = spec.metrics[0]
        d = diffs[(c, metric.key)]
        text = verdict(d, metric.higher_is_better) + (f"; {band_verdict(d, c.margin)}" if c.margin is not None else "")
        rows.append((c, d, text))
        lines.append(f"| {c.claim} | {c.statement} | {c.task} | {metric.label} | {d.n} | {d} | "
                     f"`{c.variant}` vs `{c.baseline}`: {text} |")
        comparisons.append({"claim": c.claim, "task": c.task, "variant": c.variant, "baseline": c.baseline,
                            "metric": metric.key, "seeds": d.n, "mean_diff": d.mean, "std_diff": d.std,
                            "ci95": [d.ci_low, d.ci_high], "verdict": text,
                            **({"margin": c.margin} if c.margin is not None else {})})
    if rows:
        png = plot_differences(rows, out / "differences.png")
        lines += ["", f"![paired differences with 95% intervals]({png.name})"]

    large = []
    if (spec := by_key.get("large_batch")) is not None:
        for name in spec.variants:
            runs = table.get((spec.key, name), {})
            if runs:
                loss = summarize(list(_values(runs, "eval_loss").values()))
                large.append({"optimizer": variants[name].optimizer if name != "bert" else "bertadam", "variant": name,
                              "batch_size": spec.batch_size, "steps": spec.steps,
                              "lr": next(iter(runs.values())).lr, "seeds": len(runs),
                              "heldout_loss_mean": loss.mean, "heldout_loss_std": loss.std,
                              "heldout_accuracy_mean": summarize(list(_values(runs, "eval_accuracy").values())).mean})
    claims = {"command": command, "versions": _versions(), "comparisons": comparisons, "few_sample": few_results,
              "large_batch": large, "sweeps": [s.to_json() for s in sweeps]}
    (claims_json or out / "study-claims.json").write_text(json.dumps(claims, indent=1) + "\n", encoding="utf-8")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
