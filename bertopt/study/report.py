"""The study's Markdown report and plots, computed only from the runs' own files."""

from __future__ import annotations

import math
import platform
from collections import defaultdict
from pathlib import Path

from bertopt.study.early_steps import EarlyStep
from bertopt.study.grid import RunRecord, TaskSpec
from bertopt.study.stats import PairedDifference, paired_difference, summarize
from bertopt.study.variants import BASELINE, Variant

# Each claim: (number, statement, variant, baseline variant); the primary metric decides.
CLAIMS = (
    (1, "With Adam, decoupled weight decay beats L2 regularisation added to the loss", "adam_l2", "bert"),
    (2, "With warmup, bias correction can be dropped without harm", "adamw", "bert"),
    (3, "Warmup protects early training", "no_warmup", "bert"),
    (4, "Fine-tuning with BERT's optimizer gains a little (under half a point) over plain Adam", "adam", "bert"),
    (5, "LAMB matters only at large batch (base batch)", "lamb", "bert"),
    (5, "LAMB matters only at large batch (4x batch)", "lamb_4x", "bert_4x"),
    (5, "LAMB matters only at large batch (base batch, each at its own LR)", "lamb_lr", "bert_lr"),
    (5, "LAMB matters only at large batch (4x batch, each at its own LR)", "lamb_4x_lr", "bert_4x_lr"),
)
# Variants compared with another variant than the baseline (same batch size)
COMPARED_WITH = {variant: base for _, _, variant, base in CLAIMS if base != BASELINE}


def _by(records: list[RunRecord]) -> dict[tuple[str, str], dict[int, RunRecord]]:
    table: dict[tuple[str, str], dict[int, RunRecord]] = defaultdict(dict)
    for r in records:
        table[(r.task, r.variant)][r.seed] = r
    return table


def _values(runs: dict[int, RunRecord], key: str) -> dict[int, float]:
    return {seed: float(r.summary[key]) for seed, r in runs.items() if isinstance(r.summary.get(key), (int, float))}


def early_loss(run: RunRecord, fraction: float = 0.2) -> float:
    """Mean training loss over the first ``fraction`` of the logged points (claim 3)."""
    early = [loss for _, loss in run.curve[:max(1, math.ceil(fraction * len(run.curve)))]]
    return sum(early) / len(early)


def verdict(diff: PairedDifference, higher_is_better: bool) -> str:
    """'variant better' / 'baseline better' / 'not distinguishable' from the 95% interval."""
    if not diff.distinguishable:
        return "not distinguishable"
    variant_better = (diff.mean > 0) == higher_is_better
    return "variant better" if variant_better else "baseline better"


def _save(fig, axes, path: Path) -> Path:
    """Grid and legend on every panel, then the PNG; the figure is closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(records: list[RunRecord], spec: TaskSpec, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in spec.variants:
        runs = [r for r in records if r.task == spec.name and r.variant == variant]
        if not runs:
            continue
        steps = sorted({s for r in runs for s, _ in r.curve})
        mean = [sum(dict(r.curve).get(s, float("nan")) for r in runs) / len(runs) for s in steps]
        line, = ax_loss.plot(steps, mean, label=variant, linewidth=1.4)
        ax_lr.plot(*zip(*runs[0].lr_curve), color=line.get_color(), label=variant, linewidth=1.2)
    ax_loss.set(title=f"{spec.title}: training loss (mean over seeds)", xlabel="step", ylabel="loss")
    ax_lr.set(title="learning rate used", xlabel="step", ylabel="lr")
    return _save(fig, (ax_loss, ax_lr), path)


def plot_early_steps(records: list[EarlyStep], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_report(out: Path, specs: list[TaskSpec], variants: dict[str, Variant], records: list[RunRecord],
                 early: list[EarlyStep], *, command: str, seeds: list[int], wall_seconds: float) -> Path:
    import os

    table = _by(records)
    lines = [
        "# bertopt study: BERT's optimizer recipe, claim by claim",
        "",
        f"Command: `{command}`  ",
        f"Versions: {_versions()}; {os.cpu_count()} CPU cores.  ",
        f"Seeds: {seeds}; {len(records)} runs taking {sum(r.seconds for r in records) / 60:.1f} min of training "
        f"(each run's own wall time); this invocation {wall_seconds / 60:.1f} min (finished runs are reused).",
        "",
        "Every variant is the BERT recipe (BertAdam: no bias correction, decoupled weight decay 0.01 "
        "except LayerNorm/bias, global clip 1.0, 10% linear warmup, Google's linear decay) with one "
        "thing changed. Runs with the same seed share initialisation and data order. Differences are "
        "paired by seed: mean ± std [95% t-interval]; *not distinguishable* means the interval contains 0.",
        "",
        "| variant | what changes |",
        "|---|---|",
    ]
    used = [v for v in variants.values() if any(v.name in s.variants for s in specs)]
    lines += [f"| `{v.name}` | {v.label} |" for v in used]

    for spec in specs:
        lines += ["", f"## {spec.title}", "",
                  f"`bertopt {spec.name}` with lr {spec.lr:g}, batch {spec.batch_size}, {spec.steps} steps "
                  f"(scaled by the variant's batch multiplier), settings `{_settings_text(spec.settings)}`.", ""]
        header = "| variant | " + " | ".join(m.label for m in spec.metrics) + " | early loss | s/run |"
        lines += [header, "|" + "---|" * (len(spec.metrics) + 3)]
        for name in spec.variants:
            runs = table.get((spec.name, name), {})
            if not runs:
                continue
            cells = [str(summarize(list(_values(runs, m.key).values()))) for m in spec.metrics]
            early_mean = summarize([early_loss(r) for r in runs.values()])
            seconds = summarize([r.seconds for r in runs.values()]).mean
            lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {early_mean} | {seconds:.0f} |")
        others = "; ".join(f"for `{v}` against `{b}`" for v, b in COMPARED_WITH.items() if v in spec.variants)
        lines += ["", f"Paired differences against `{BASELINE}` (variant − baseline"
                  + (f"; {others}" if others else "") + "):", ""]
        lines += ["| variant | " + " | ".join(m.label for m in spec.metrics) + " |", "|" + "---|" * (len(spec.metrics) + 1)]
        for name in spec.variants:
            base = COMPARED_WITH.get(name, BASELINE)
            if name == base or (spec.name, name) not in table or (spec.name, base) not in table:
                continue
            cells = []
            for m in spec.metrics:
                diff = paired_difference(_values(table[(spec.name, name)], m.key), _values(table[(spec.name, base)], m.key))
                cells.append(f"{diff} {verdict(diff, m.higher_is_better)}")
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        png = plot_curves(records, spec, out / f"curves-{spec.name}.png")
        lines += ["", f"![{spec.title} loss curves and learning rates]({png.name})"]

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

    lines += ["", "## Claims", "", "| # | claim | task | metric | variant − baseline | verdict |", "|---|---|---|---|---|---|"]
    for number, statement, variant, base in CLAIMS:
        for spec in specs:
            if variant not in spec.variants or base not in spec.variants:
                continue
            metric = spec.metrics[0]
            diff = paired_difference(_values(table[(spec.name, variant)], metric.key),
                                     _values(table[(spec.name, base)], metric.key))
            lines.append(f"| {number} | {statement} | {spec.name} | {metric.label} | {diff} | "
                         f"`{variant}` vs `{base}`: {verdict(diff, metric.higher_is_better)} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
