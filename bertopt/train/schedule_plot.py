"""`bertopt schedule`: print and plot the learning rate of a schedule, step by step.

Example: ``bertopt schedule --steps 1000 --warmup-proportion 0.1 --compare`` shows
Google's BERT schedule (LR drops when warmup ends) beside transformers' rebased one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bertopt import schedules

HELP = "print and plot (PNG) the learning rate of a schedule, e.g. google vs rebased BERT warmup/decay"

STYLE_LABELS = {
    "google": "google (google-research/bert: decay counted from step 0)",
    "rebased": "rebased (transformers: decay from the peak at the end of warmup)",
}

# CLI option -> schedule keyword, passed on only when given so each schedule gets its own defaults.
SCHEDULE_OPTIONS = {
    "power": "power",
    "end_factor": "end_factor",
    "num_cycles": "num_cycles",
    "decay_steps": "num_decay_steps",
    "decay_shape": "decay_shape",
    "timescale": "timescale",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schedule", default="bert", choices=schedules.SCHEDULE_NAMES,
                        help="schedule name (default: bert)")
    parser.add_argument("--style", choices=schedules.STYLES, default=None,
                        help="for bert/polynomial: google (default) or rebased")
    parser.add_argument("--compare", action="store_true",
                        help="for bert/polynomial: show the google and rebased styles together")
    parser.add_argument("--steps", type=int, default=1000, help="number of training steps T (default: 1000)")
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=float, default=None, help="warmup steps W")
    warmup.add_argument("--warmup-proportion", type=float, default=0.1,
                        help="W = int(T * proportion) when --warmup-steps is not given (default: 0.1)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak (base) learning rate (default: 5e-5)")
    parser.add_argument("--power", type=float, help="polynomial: decay exponent (NVIDIA LAMB: 0.5)")
    parser.add_argument("--end-factor", type=float, help="final LR as a fraction of --lr")
    parser.add_argument("--num-cycles", type=float, help="cosine / cosine_with_hard_restarts: cycles")
    parser.add_argument("--decay-steps", type=int, help="wsd: length of the final decay")
    parser.add_argument("--decay-shape", choices=schedules.WSD_DECAY_SHAPES, help="wsd: decay shape")
    parser.add_argument("--timescale", type=float, help="inverse_sqrt: timescale (default: W)")
    parser.add_argument("--every", type=int, default=None,
                        help="print every N-th step (default: T/20); warmup end and T are always printed")
    parser.add_argument("--out", type=Path, default=Path("schedule.png"), help="PNG to write (default: schedule.png)")


def learning_rates(args: argparse.Namespace) -> dict[str, tuple[list[float], float]]:
    """Curve label -> (LR at steps 0..T, warmup steps W), one curve per compared style."""
    import torch

    options = {kw: getattr(args, opt) for opt, kw in SCHEDULE_OPTIONS.items() if getattr(args, opt) is not None}
    warmup = args.warmup_steps
    if warmup is not None and float(warmup).is_integer():
        warmup = int(warmup)
    if warmup is None:
        options["warmup_proportion"] = args.warmup_proportion
    styles = [args.style or "google"]
    if args.compare:
        if args.schedule not in ("bert", "polynomial"):
            raise ValueError(f"--compare needs --schedule bert or polynomial, not {args.schedule!r}")
        if args.style is not None:
            raise ValueError("--compare shows both styles; leave out --style")
        styles = list(schedules.STYLES)
    elif args.style is not None and args.schedule not in ("bert", "polynomial"):
        raise ValueError(f"--style applies to --schedule bert or polynomial, not {args.schedule!r}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")

    curves = {}
    for style in styles:
        extra = {"style": style} if args.schedule in ("bert", "polynomial") else {}
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
        scheduler = schedules.get_schedule(args.schedule, optimizer, args.steps, warmup, **options, **extra)
        label = STYLE_LABELS[style] if extra else args.schedule
        lrs = [scheduler.lr_at(step)[0] for step in range(args.steps + 1)]
        curves[label] = (lrs, scheduler.schedule.num_warmup_steps)
    return curves


def table_steps(total: int, warmup: float, every: int) -> list[int]:
    steps = set(range(0, total + 1, every)) | {total}
    if 0 < warmup <= total:
        first_after = int(warmup) if float(warmup).is_integer() else int(warmup) + 1
        steps |= {max(first_after - 1, 0), first_after}  # the last warmup step and the first after it
    return sorted(steps)


def print_table(curves: dict[str, tuple[list[float], float]], every: int) -> None:
    labels = list(curves)
    total = len(curves[labels[0]][0]) - 1
    warmup = curves[labels[0]][1]
    names = [label.split(" ")[0] for label in labels]
    print(f"{'step':>8}  " + "  ".join(f"{name:>14}" for name in names))
    for step in table_steps(total, warmup, every):
        note = ""
        if step == total:
            note = "  <- end of training"
        elif step < warmup <= step + 1:
            note = "  <- last warmup step"
        elif step - 1 < warmup <= step and warmup > 0:
            note = "  <- first step after warmup"
        print(f"{step:>8}  " + "  ".join(f"{curves[label][0][step]:>14.8g}" for label in labels) + note)


def plot(curves: dict[str, tuple[list[float], float]], args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure  # the object API needs no GUI backend (Agg is implied)

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.subplots()
    for linestyle, (label, (lrs, _)) in zip(("-", "--"), curves.items()):  # dashed: both visible where equal
        ax.plot(range(len(lrs)), lrs, label=label, linewidth=1.8, linestyle=linestyle)
    warmup = next(iter(curves.values()))[1]
    if warmup > 0:
        ax.axvline(warmup, color="grey", linestyle=":", linewidth=1, label=f"end of warmup (W={warmup:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"bertopt schedule {args.schedule}: T={args.steps}, W={warmup:g}, lr={args.lr:g}")
    ax.set_xlim(0, args.steps)
    peak = max(max(lrs) for lrs, _ in curves.values())
    ax.set_ylim(0, peak * 1.3 if peak > 0 else 1.0)  # headroom so the legend never covers a curve
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, format="png")


def run(args: argparse.Namespace) -> int:
    try:
        curves = learning_rates(args)
        every = args.every if args.every is not None else max(1, args.steps // 20)
        if every <= 0:
            raise ValueError(f"--every must be a positive integer, got {every}")
    except ValueError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"bertopt schedule: error: {exc}", file=sys.stderr)
        return 2
    warmup = next(iter(curves.values()))[1]
    print(f"schedule {args.schedule}: T={args.steps} steps, W={warmup:g} warmup steps, peak lr={args.lr:g}")
    for label in curves:
        if label != args.schedule:
            print(f"  {label}")
    print_table(curves, every)
    plot(curves, args)
    print(f"wrote {args.out}")
    return 0
