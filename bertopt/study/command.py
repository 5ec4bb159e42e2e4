"""`bertopt study`: run the grid, measure the early steps, write the report."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HELP = "test the BERT recipe's claims: a grid of optimizer variants x seeds on MLM pretraining and fine-tuning"


def task_specs(quick: bool):
    from bertopt.study.grid import Metric, TaskSpec

    pretrain_metrics = (Metric("eval_loss", "held-out MLM loss", False), Metric("eval_accuracy", "held-out MLM accuracy", True))
    finetune_metrics = (Metric("test_accuracy", "test accuracy", True), Metric("dev_accuracy", "dev accuracy", True),
                        Metric("test_loss", "test loss", False))
    pretrain_variants = ("bert", "adamw", "adam_l2", "no_warmup", "no_clip", "adam", "lamb", "bert_4x", "lamb_4x",
                         "bert_lr", "lamb_lr", "bert_4x_lr", "lamb_4x_lr")
    finetune_variants = ("bert", "adamw", "adam_l2", "no_warmup", "no_clip", "adam", "lamb", "bert_lr", "lamb_lr")
    if quick:
        return [
            TaskSpec("pretrain", "MLM pretraining (quick)", 2e-3, 8, 12,
                     {"preset": "nano", "seq_len": 32, "eval_sequences": 16,
                      "run": {"log_every": 2, "threads": 1}}, pretrain_metrics, pretrain_variants),
            TaskSpec("finetune", "Fine-tuning MiniLM on Rotten Tomatoes (quick)", 1e-4, 8, 10,
                     {"max_seq_length": 24, "max_train_examples": 80, "max_eval_examples": 32,
                      "run": {"log_every": 2, "eval_every": 0, "threads": 1}}, finetune_metrics, finetune_variants),
        ]
    return [
        TaskSpec("pretrain", "MLM pretraining, BERT-tiny on the Wikipedia sample", 1e-3, 32, 240,
                 {"preset": "tiny", "seq_len": 64, "run": {"log_every": 10, "eval_every": 0, "threads": 1}},
                 pretrain_metrics, pretrain_variants),
        TaskSpec("finetune", "Fine-tuning MiniLM-L6 on Rotten Tomatoes", 1e-4, 32, 100,
                 {"max_seq_length": 40, "run": {"log_every": 10, "eval_every": 0, "threads": 1}},
                 finetune_metrics, finetune_variants),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny runs (about 2 minutes): checks the machinery, not the claims")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: 3; quick: 2)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="run only these variants (default: all of each task's)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds are first-seed .. first-seed+seeds-1 (to split a study over processes; default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="output directory (default: runs/study)")
    parser.add_argument("--tasks", nargs="+", choices=("pretrain", "finetune"), default=("pretrain", "finetune"),
                        help="which tasks to run (default: both)")


def run(args: argparse.Namespace) -> int:
    from bertopt.study import early_steps
    from bertopt.study.grid import run_grid
    from bertopt.study.report import write_report
    from bertopt.study.variants import BY_NAME

    count = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    seeds = list(range(args.first_seed, args.first_seed + count))
    if not seeds:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    specs = [s for s in task_specs(args.quick) if s.name in args.tasks]
    if args.variants:
        unknown = set(args.variants) - set(BY_NAME)
        if unknown:
            raise ValueError(f"--variants: unknown {sorted(unknown)}; choose from {sorted(BY_NAME)}")
        specs = [dataclasses.replace(s, variants=tuple(v for v in args.variants if v in s.variants)) for s in specs]
    start = time.perf_counter()
    records = run_grid(specs, BY_NAME, seeds, out)
    early = early_steps.measure_cached(out / "early-steps.json", **(
        dict(steps=12, warmup_steps=6, total_steps=60, preset="nano", batch_size=4, seq_len=32)
        if args.quick else dict(steps=60, warmup_steps=30, total_steps=300)))
    command = "bertopt study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else "bertopt study"
    report = write_report(out, specs, BY_NAME, records, early, command=command, seeds=seeds,
                          wall_seconds=time.perf_counter() - start)
    print(f"report: {report}")
    return 0
