"""Optimizer and schedule flags shared by ``bertopt pretrain`` and ``bertopt finetune``.

    add_optimizer_arguments(parser, lr=2e-3, batch_size=32)   # each command picks its defaults
    ...
    validate_optimizer_args(args)                              # ValueError naming the flag
    optimizer, scheduler = build_optimizer(model, args, num_train_steps)

``build_optimizer`` calls :func:`bertopt.create_optimizer` (Google's recipe: BertAdam, weight decay
except LayerNorm/bias, global-norm clipping, linear warmup then linear decay), so every training
command and the study use one code path. The same settings as plain values, for summaries and
checkpoints: :func:`optimizer_settings`.
"""

from __future__ import annotations

import argparse
from typing import Any

OPTIMIZERS = ("adam", "lamb")
SCHEDULE_STYLES = ("google", "rebased")
WEIGHT_DECAY_MODES = ("decoupled", "l2")
NONFINITE_POLICIES = ("stop", "skip")  # what the training loop does with a nan/inf loss


def add_optimizer_arguments(parser: argparse.ArgumentParser, *, lr: float, batch_size: int,
                            warmup_proportion: float = 0.1, weight_decay: float = 0.01) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                       help="adam: BertAdam, Google's recipe (default); lamb: LAMB")
    group.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"examples per optimizer step, over all processes (default: {batch_size})")
    warmup = group.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-proportion", type=float, default=warmup_proportion,
                        help=f"fraction of the steps with linear warmup from 0 (default: {warmup_proportion:g})")
    warmup.add_argument("--warmup-steps", type=int, default=None, help="warmup steps (instead of a proportion)")
    group.add_argument("--schedule-style", choices=SCHEDULE_STYLES, default="google",
                       help="google: linear decay counted from step 0 (BERT, default); "
                            "rebased: decay starts at the peak (transformers)")
    group.add_argument("--weight-decay", type=float, default=weight_decay,
                       help=f"weight decay, not applied to LayerNorm and bias parameters (default: {weight_decay:g})")
    group.add_argument("--weight-decay-mode", choices=WEIGHT_DECAY_MODES, default="decoupled",
                       help="decoupled: update += wd * param, as BERT (default); l2: wd * param added to the gradient")
    group.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                       help="Adam bias correction (default: the optimizer's own: off for adam, as BERT, "
                            "where --bias-correction makes BertAdam AdamW; on for lamb)")
    group.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip gradients to this global norm; 0 disables (default: 1.0)")
    group.add_argument("--on-nonfinite", choices=NONFINITE_POLICIES, default="stop",
                       help="a nan/inf training loss: stop with an error naming the step (default), or skip that "
                            "update (10 in a row still stop); the last checkpoint stays intact either way")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def validate_optimizer_args(args: argparse.Namespace, num_train_steps: int | None = None) -> None:
    """ValueError naming the flag and its allowed range."""
    if not (args.lr > 0 and args.lr < 1):
        raise ValueError(f"--lr must be in (0, 1); got {args.lr}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    if not 0 <= args.warmup_proportion <= 1:
        raise ValueError(f"--warmup-proportion must be in [0, 1]; got {args.warmup_proportion}")
    if args.warmup_steps is not None:
        if args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0; got {args.warmup_steps}")
        if num_train_steps is not None and args.warmup_steps > num_train_steps:
            raise ValueError(f"--warmup-steps {args.warmup_steps} is longer than training ({num_train_steps} steps)")
    if not 0 <= args.weight_decay < 1:
        raise ValueError(f"--weight-decay must be in [0, 1); got {args.weight_decay}")
    if not args.max_grad_norm >= 0:
        raise ValueError(f"--max-grad-norm must be >= 0 (0 disables clipping); got {args.max_grad_norm}")
    if args.optimizer == "lamb" and args.weight_decay_mode != "decoupled":
        raise ValueError("--weight-decay-mode l2 is for --optimizer adam; LAMB's decay is part of its update")
    if args.optimizer == "lamb":
        import bertopt

        if not hasattr(bertopt, "Lamb"):
            raise ValueError("--optimizer lamb: this version of bertopt has no LAMB optimizer yet; use --optimizer adam")


def resolved_bias_correction(args: argparse.Namespace) -> bool:
    """Whether the run uses bias correction: the flag, or the optimizer's default (adam off, lamb on)."""
    if args.bias_correction is not None:
        return bool(args.bias_correction)
    return args.optimizer == "lamb"


def optimizer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The optimizer flags as a plain dict (for summary.json, checkpoints and resume checks)."""
    return {
        "optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size,
        "warmup_proportion": args.warmup_proportion, "warmup_steps": args.warmup_steps,
        "schedule_style": args.schedule_style, "weight_decay": args.weight_decay,
        "weight_decay_mode": args.weight_decay_mode, "bias_correction": resolved_bias_correction(args),
        "max_grad_norm": args.max_grad_norm, "seed": args.seed,
    }


def build_optimizer(model, args: argparse.Namespace, num_train_steps: int):
    """``(optimizer, scheduler)`` for ``model`` from the parsed flags, via bertopt.create_optimizer."""
    import bertopt

    validate_optimizer_args(args, num_train_steps)
    overrides: dict[str, Any] = {}
    # pass the non-default variants only, so the call is Google's recipe unless asked otherwise
    if args.bias_correction is not None:
        overrides["bias_correction"] = args.bias_correction
    if args.weight_decay_mode != "decoupled":
        overrides["weight_decay_mode"] = args.weight_decay_mode
    return bertopt.create_optimizer(
        model, args.lr, num_train_steps, args.warmup_steps, optimizer=args.optimizer,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        schedule_style=args.schedule_style, warmup_proportion=args.warmup_proportion, **overrides)
