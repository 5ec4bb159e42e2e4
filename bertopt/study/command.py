"""`bertopt study`: run the parts of the study, measure the early steps, write the report and the claims JSON."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HELP = "test the BERT recipe's claims: optimizer variants x seeds in fine-tuning and MLM pretraining"

PARTS = ("finetune", "few_sample", "few_sample_lr1e-4", "large_batch", "decay")


def task_specs(quick: bool):
    """The study's parts. Full: about four hours of a 2-core machine (two runs side by side, one
    thread each); quick: about 2.5 minutes of one core, to check the machinery, not the claims."""
    from bertopt.study.grid import Metric, TaskSpec

    mlm = (Metric("eval_loss", "held-out MLM loss", False), Metric("eval_accuracy", "held-out MLM accuracy", True))
    classify = (Metric("test_accuracy", "test accuracy", True), Metric("dev_accuracy", "dev accuracy", True),
                Metric("test_loss", "test loss", False))
    few = (Metric("dev_accuracy", "dev accuracy", True), Metric("test_accuracy", "test accuracy", True))
    dev = classify[1]
    held_out = mlm[0]
    finetune_lrs = (2.5e-5, 5e-5, 1e-4)  # the BERT paper's range, and twice its top
    if quick:
        quick_run = {"log_every": 2, "eval_every": 0, "threads": 1}
        quick_few = {"max_seq_length": 24, "max_train_examples": 16, "max_eval_examples": 24, "epochs": 2.0,
                     "run": quick_run}
        return [
            TaskSpec("finetune", "finetune", "Fine-tuning MiniLM on Rotten Tomatoes (quick)", 1e-4, 8, 6,
                     {"max_seq_length": 24, "max_train_examples": 48, "max_eval_examples": 24, "run": quick_run},
                     classify, ("bert", "adamw", "adam"), seeds=2,
                     sweep={"bert": (1e-4, 4e-4), "adamw": (1e-4, 4e-4)}, sweep_metric=dev, lr_from={"adam": "adamw"}),
            TaskSpec("few_sample", "finetune", "Few-sample fine-tuning (quick)", 1e-4, 8, None, quick_few, few,
                     ("bert", "adamw"), seeds=3, failure_table=True),
            TaskSpec("few_sample_lr1e-4", "finetune", "Few-sample fine-tuning at a larger LR (quick)", 4e-4, 8, None,
                     quick_few, few, ("bert", "adamw"), seeds=2, failure_table=True),
            TaskSpec("large_batch", "pretrain", "MLM pretraining at large batch (quick)", 2e-3, 32, 4,
                     {"preset": "nano", "seq_len": 32, "eval_sequences": 16,
                      "run": {**quick_run, "grad_accum_steps": 4}}, mlm, ("bert", "lamb"), seeds=2,
                     sweep={"bert": (2e-3, 8e-3), "lamb": (2e-2, 8e-2)}, sweep_metric=held_out),
            TaskSpec("decay", "pretrain", "Decoupled decay vs L2 (quick)", 2e-3, 8, 12,
                     {"preset": "nano", "seq_len": 32, "eval_sequences": 16, "run": quick_run}, mlm,
                     ("bert", "adam_l2", "bert_wd0.1", "adam_l2_wd0.1"), seeds=2),
        ]
    ft_run = {"log_every": 10, "eval_every": 0, "threads": 1}
    few_settings = {"max_train_examples": 1000, "max_eval_examples": 400, "epochs": 3.0, "run": ft_run}
    return [
        # Claims 2 and 4 at standard settings: one epoch (318 steps of 32), 10% warmup, each
        # optimizer at the LR its sweep chose on dev accuracy (plain Adam takes AdamW's: the two
        # differ only by decay 0.01, which moves weights by ~1e-4 of themselves in 318 steps).
        TaskSpec("finetune", "finetune", "Fine-tuning MiniLM-L6 on Rotten Tomatoes, one epoch", 2.5e-5, 32, None,
                 {"epochs": 1.0, "run": ft_run}, classify, ("bert", "adamw", "adam"), seeds=10,
                 sweep={"bert": finetune_lrs, "adamw": finetune_lrs}, sweep_metric=dev, lr_from={"adam": "adamw"}),
        # Zhang et al. / Mosbach et al.: 1,000 examples, 3 epochs, bias correction on and off at
        # the same LR (BertAdam's, 2.5e-5, inside the papers' 1e-5..5e-5). The subset is fixed
        # (the first 1,000 rows of the hashed train split); the seed changes the classifier's
        # initialisation, dropout and the order of the data.
        TaskSpec("few_sample", "finetune", "Few-sample fine-tuning: 1,000 examples, 3 epochs", 2.5e-5, 32, None,
                 few_settings, few, ("bert", "adamw"), seeds=20, failure_table=True),
        # The same at 4x the LR, 1e-4 (AdamW's choice in the one-epoch sweep), added after the
        # 2.5e-5 runs: there bias-corrected Adam barely leaves the majority class in 93 steps
        # (its steps are 3 to 6.6 times smaller than BertAdam's), so equal LRs compare step sizes, and the
        # papers' instability, if it is here, shows at larger steps. 10 seeds: what the budget left.
        TaskSpec("few_sample_lr1e-4", "finetune", "Few-sample fine-tuning at lr 1e-4: 1,000 examples, 3 epochs", 1e-4,
                 32, None, few_settings, few, ("bert", "adamw"), seeds=10, failure_table=True),
        # Claim 5 where it is made: global batch 1,024 (8 micro-batches of 128), 20 steps (1.3M
        # tokens), each optimizer at its own LR: the batch-32 rates (BertAdam 1e-3, LAMB 1e-2)
        # scaled by sqrt(1024/32) as You et al. do, and half and twice that.
        TaskSpec("large_batch", "pretrain", "MLM pretraining at batch 1,024 (BERT-tiny)", 5.7e-3, 1024, 20,
                 {"preset": "tiny", "seq_len": 64, "run": {"grad_accum_steps": 8, "log_every": 2, "eval_every": 0,
                                                          "threads": 1}}, mlm, ("bert", "lamb"), seeds=3,
                 sweep={"bert": (2.8e-3, 5.7e-3, 1.1e-2), "lamb": (2.8e-2, 5.7e-2, 1.1e-1)}, sweep_metric=held_out),
        # Claim 1 where decay has time to act: 2,000 steps, weight decay 0.01 and 0.1.
        TaskSpec("decay", "pretrain", "Decoupled decay vs L2: 2,000 pretraining steps (BERT-tiny)", 1e-3, 16, 2000,
                 {"preset": "tiny", "seq_len": 32, "run": {"log_every": 50, "eval_every": 0, "threads": 1}}, mlm,
                 ("bert", "adam_l2", "bert_wd0.1", "adam_l2_wd0.1"), seeds=3),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny runs (about 2.5 minutes): checks the machinery, not the claims")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which parts to run (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: each part's own)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="run only these variants (default: all of each part's)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ... (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"),
                        help="output directory (default: runs/study). Start the same command twice to use two cores: "
                             "the processes share the runs.")
    parser.add_argument("--claims-json", type=Path, default=None,
                        help="where to write the machine-readable verdicts (default: <out>/study-claims.json)")
    parser.add_argument("--no-report", action="store_true", help="only run (another process will write the report)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs that have finished (while others still run)")


def run(args: argparse.Namespace) -> int:
    from bertopt.errors import EXIT_SIGINT, Terminated, exit_code
    from bertopt.study import early_steps
    from bertopt.study.grid import run_grid
    from bertopt.study.report import write_report
    from bertopt.study.variants import BY_NAME

    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    specs = [s for s in task_specs(args.quick) if s.key in args.parts]
    if args.variants:
        unknown = set(args.variants) - set(BY_NAME)
        if unknown:
            raise ValueError(f"--variants: unknown {sorted(unknown)}; choose from {sorted(BY_NAME)}")
        specs = [dataclasses.replace(s, variants=tuple(v for v in s.variants if v in args.variants)) for s in specs]
    seeds = {s.key: list(range(args.first_seed, args.first_seed + (args.seeds or s.seeds))) for s in specs}
    start = time.perf_counter()
    try:
        records, sweeps = run_grid(specs, BY_NAME, seeds, out, train=not args.report_only)
    except (KeyboardInterrupt, Terminated) as exc:
        code = exit_code(exc)
        print(f"bertopt study: stopped by {'Ctrl-C' if code == EXIT_SIGINT else 'SIGTERM'}; the finished runs in {out} "
              "are kept (an interrupted one starts again): run the same command again to continue.",
              file=sys.stderr, flush=True)
        return code
    if args.no_report:
        return 0
    early = early_steps.measure_cached(out / "early-steps.json", **(
        dict(steps=12, warmup_steps=6, total_steps=60, preset="nano", batch_size=4, seq_len=32)
        if args.quick else dict(steps=60, warmup_steps=30, total_steps=300)))
    command = "bertopt study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else "bertopt study"
    report = write_report(out, specs, BY_NAME, records, sweeps, early, command=command,
                          wall_seconds=time.perf_counter() - start, claims_json=args.claims_json)
    print(f"report: {report}")
    return 0
