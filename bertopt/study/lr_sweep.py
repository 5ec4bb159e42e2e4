"""Each optimizer's own learning rate for the study's LAMB claim (5), by a sweep on a seed of its own.

At BertAdam's LR, LAMB barely trains: its step per tensor is ``lr * ||p||``, not ``lr`` per
element. To compare the optimizers rather than one LR, each gets the LR multiplier (relative to
the task's LR in the study) that did best on a seed the study does not use, judged by the
held-out MLM loss (pretraining) or the *dev* accuracy (fine-tuning); the test split is not
looked at. Pretraining is swept at the base batch and at 4x batch (there with 2x the
multiplier, the scaling the study's 4x variants use).

    python -m bertopt.study.lr_sweep --optimizer lamb --out runs/lr-sweep --seed 100
    python -m bertopt.study.lr_sweep --optimizer adam --out runs/lr-sweep --seed 100 \
        --multipliers 0.0625 0.125 0.25 0.5 1 2 4

writes ``<out>/lr-sweep-<optimizer>-<tasks>.json`` (every run's metrics and the choice) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bertopt.study.command import task_specs
from bertopt.study.grid import run_one
from bertopt.study.variants import Variant

# (task, batch multiplier, metric used to choose, higher is better)
SWEEPS = (("pretrain", 1, "eval_loss", False), ("pretrain", 4, "eval_loss", False),
          ("finetune", 1, "dev_accuracy", True))


def sweep(out: Path, seed: int, multipliers: list[float], tasks: tuple[str, ...], *, optimizer: str = "lamb",
          quick: bool = False, log=print) -> dict:
    specs = {s.name: s for s in task_specs(quick)}
    results = []
    for task, batch_multiplier, metric, higher in SWEEPS:
        if task not in tasks:
            continue
        spec = specs[task]
        runs = []
        for m in multipliers:
            lr_multiplier = m * (2.0 if batch_multiplier == 4 else 1.0)
            name = f"{optimizer}{'_4x' if batch_multiplier == 4 else ''}_lrx{lr_multiplier:g}"
            variant = Variant(name, f"{optimizer}, lr x{lr_multiplier:g}", "5", optimizer=optimizer,
                              batch_multiplier=batch_multiplier, lr_multiplier=lr_multiplier)
            record = run_one(spec, variant, seed, out / "runs" / task / name / f"seed{seed}", log=log)
            runs.append({"multiplier": lr_multiplier, "lr": spec.lr * lr_multiplier,
                         **{k: record.summary.get(k) for k in ("eval_loss", "eval_accuracy", "dev_accuracy")
                            if k in record.summary}})
        best = (max if higher else min)(runs, key=lambda r: r[metric])
        results.append({"task": task, "batch_multiplier": batch_multiplier, "chosen_by": metric,
                        "runs": runs, "best_multiplier": best["multiplier"]})
    report = {"optimizer": optimizer, "seed": seed, "multipliers": multipliers, "quick": quick, "sweeps": results}
    (out / f"lr-sweep-{optimizer}-{'-'.join(tasks)}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=("lamb", "adam"), default="lamb",
                        help="lamb (LAMB) or adam (BertAdam, the study's recipe)")
    parser.add_argument("--out", type=Path, default=Path("runs/lr-sweep"))
    parser.add_argument("--seed", type=int, default=100, help="a seed the study itself does not use (default: 100)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[2.5, 5.0, 10.0, 20.0, 80.0],
                        help="LR multipliers relative to the task's BertAdam LR (default: 2.5 5 10 20 80)")
    parser.add_argument("--tasks", nargs="+", choices=("pretrain", "finetune"), default=("pretrain", "finetune"))
    parser.add_argument("--quick", action="store_true", help="the study's tiny runs: checks the machinery")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = sweep(args.out, args.seed, args.multipliers, tuple(args.tasks), optimizer=args.optimizer,
                   quick=args.quick)
    for s in report["sweeps"]:
        print(f"{s['task']} batch x{s['batch_multiplier']} (by {s['chosen_by']}):")
        for r in s["runs"]:
            print(f"  lr x{r['multiplier']:g} = {r['lr']:.3g}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in r.items() if k not in ("multiplier", "lr")))
        print(f"  best: x{s['best_multiplier']:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
