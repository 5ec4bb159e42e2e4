"""Command-line entry point: arguments -> configs -> commands; nothing else.

``bertopt pretrain`` and ``bertopt finetune`` flags become a :class:`~bertopt.train.config.PretrainConfig`
or :class:`~bertopt.train.config.FinetuneConfig` (whose defaults are the flags' defaults and whose
checks give the error messages), which the command skeleton (:mod:`bertopt.train.command`) runs.
The other commands (``schedule``, ``bench``, ``study``) keep their flags in their own modules
(``HELP``, ``add_arguments(parser)``, ``run(args) -> int``). Heavy imports (transformers,
matplotlib) happen inside the commands, so ``bertopt --help`` stays fast.

Errors: whatever a command does not handle itself ends here as one paragraph on stderr and an
exit code (:data:`bertopt.errors.EXIT_CODES`), never a Python traceback unless ``--debug`` is
given (before or after the command name). Ctrl-C and SIGTERM outside the training steps stop the
command with 130 / 143; during the training steps the loop handles them itself (checkpoint, then
the same exit codes).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bertopt.errors import EXIT_CODES, EXIT_USAGE, Terminated, exit_code, report_error, report_stop
from bertopt.train.config import (DATA_ORDERS, DEVICES, NONFINITE_POLICIES, OBJECTIVES, OPTIMIZERS, PRECISIONS,
                                  SCHEDULE_STYLES, SPIKE_POLICIES, WEIGHT_DECAY_MODES, FinetuneConfig, OptimConfig,
                                  PretrainConfig, RunConfig,
                                  help_text)

OTHER_COMMANDS = {
    "schedule": "bertopt.train.schedule_plot",
    "bench": "bertopt.bench.command",
    "study": "bertopt.study.command",
    "import-tf": "bertopt.interop.import_command",
    "export-tf": "bertopt.interop.export_command",
    "create-pretraining-data": "bertopt.interop.pairs_command",
}
TRAINING_HELP = {
    "pretrain": "pretrain a BERT masked language model (default: a small BERT on a Wikipedia sample, ~3 min on 2 CPUs)",
    "finetune": "fine-tune a pretrained BERT for text classification (default: MiniLM-L6 on Rotten Tomatoes)",
}


# --- flags -> configs ---------------------------------------------------------------------------
# A flag's help is its config field's documentation (bertopt.train.config.help_text), so the two
# cannot drift apart. Every flag's default is SUPPRESS: the namespace holds only what the user
# typed, in the config section (dest "optim.lr", "run.out", "task.seq_len"), and the config's own
# defaults fill the rest; the metavar is the flag's own name (LR, BATCH_SIZE), not the dest.


def _adder(group, section: str, defaults, *, show_default: bool = True):
    """``add(flag, field=None, help=None, aliases=(), **argparse_kwargs)`` for fields of ``defaults`` (a
    config); ``aliases`` are other names of the flag (an old name kept working)."""
    def add(flag: str, field: str | None = None, help: str | None = None, aliases: tuple[str, ...] = (),
            **kwargs) -> None:
        field = field or flag.lstrip("-").replace("-", "_")
        help = help_text(type(defaults), field) if help is None else help
        takes_value = kwargs.get("action") not in ("store_true", "store_false", argparse.BooleanOptionalAction)
        if takes_value and show_default and "%(default)" not in help:
            value = getattr(defaults, field)
            if value is not None:
                help += f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"
        if takes_value and "choices" not in kwargs:
            kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        group.add_argument(flag, *aliases, dest=f"{section}.{field}", default=argparse.SUPPRESS, help=help, **kwargs)
    return add


def _bias_correction_default(optim) -> str:
    if optim.bias_correction is None:
        return "the optimizer's own: off for adam, as BERT; on for lamb"
    return f"{'on' if optim.bias_correction else 'off'}, from docs/study.md"


def _optim_and_run_flags(parser: argparse.ArgumentParser, defaults) -> None:
    """The flags of OptimConfig and RunConfig, shared by pretrain and finetune (each with its defaults)."""
    optim, run = defaults.optim, defaults.run
    group = parser.add_argument_group("optimization")
    add = _adder(group, "optim", optim)
    add("--optimizer", choices=OPTIMIZERS)
    add("--lr", type=float)
    _adder(group, "run", run)("--batch-size", type=int)
    _adder(group, "run", run)("--grad-accum-steps", type=int)
    warmup = group.add_mutually_exclusive_group()
    _adder(warmup, "optim", optim)("--warmup-proportion", type=float)
    _adder(warmup, "optim", optim)("--warmup-steps", type=int)
    add("--schedule-style", choices=SCHEDULE_STYLES)
    add("--weight-decay", type=float)
    add("--weight-decay-mode", choices=WEIGHT_DECAY_MODES)
    add("--bias-correction", action=argparse.BooleanOptionalAction,
        help=f"{help_text(OptimConfig, 'bias_correction')} (default: {_bias_correction_default(optim)})")
    add("--max-grad-norm", type=float)
    add = _adder(group, "run", run)
    add("--on-nonfinite", choices=NONFINITE_POLICIES)
    add("--on-spike", choices=SPIKE_POLICIES)
    add("--spike-window", type=int)
    add("--spike-loss-mads", type=float)
    add("--spike-min-rise", type=float)
    add("--spike-grad-ratio", type=float)
    add("--spike-patience", type=int)
    add("--spike-lr-factor", type=float)
    add("--max-rewinds", type=int)
    add("--seed", type=int)

    group = parser.add_argument_group("run")
    add = _adder(group, "run", run)
    add("--out", type=Path)
    add("--resume", nargs="?", const="auto", metavar="CHECKPOINT")
    add("--overwrite", action="store_true")
    add("--precision", choices=PRECISIONS)
    add("--compile", action="store_true")
    add("--log-every", type=int)
    add("--eval-every", type=int, help=help_text(RunConfig, "eval_every")
        + (" (default: 4 times per run)" if run.eval_every is None else ""))
    add("--save-every", type=int)
    add("--keep-checkpoints", type=int)
    add("--threads", type=int)
    add("--device", choices=DEVICES)
    add("--no-progress", field="progress", action="store_false")


def _pretrain_flags(parser: argparse.ArgumentParser) -> None:
    defaults = PretrainConfig()
    group = parser.add_argument_group("model")
    which = group.add_mutually_exclusive_group()
    _adder(which, "task", defaults, show_default=False)(
        "--preset", help=f"{help_text(PretrainConfig, 'preset')} (default: {defaults.model_name})")
    _adder(which, "task", defaults)("--config", field="config_file", type=Path, metavar="JSON")
    add = _adder(group, "task", defaults)
    add("--from", field="from_model", type=Path, metavar="MODEL", aliases=("--init-from",))  # its old name
    add("--dropout", type=float)
    group = parser.add_argument_group("data")
    add = _adder(group, "task", defaults)
    add("--corpus", nargs="+", type=Path, metavar="PATH")
    add("--line-per-document", action="store_true")
    add("--vocab-size", type=int)
    add("--cased", field="lowercase", action="store_false")
    add("--seq-len", type=int)
    add("--mask-prob", type=float)
    add("--whole-word-masking", action="store_true")
    add("--eval-sequences", type=int)
    add("--cache-dir", type=Path)
    add("--data", nargs="+", metavar="SHARDS")
    add("--eval-data", nargs="+", metavar="SHARDS")
    add("--objective", choices=OBJECTIVES)
    add("--data-order", choices=DATA_ORDERS)
    add("--vocab-file", type=Path, metavar="VOCAB")
    _optim_and_run_flags(parser, defaults)
    group = parser.add_argument_group("length and sharding")
    _adder(group, "task", defaults)("--steps", type=int)
    _adder(group, "run", defaults.run)("--fsdp", action="store_true")


def _finetune_flags(parser: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    group = parser.add_argument_group("model and data")
    add = _adder(group, "task", defaults)
    add("--model", metavar="DIR")
    add("--data", metavar="FILE")
    add("--text-column")
    add("--label-column")
    add("--dev-data", metavar="FILE")
    add("--test-data", metavar="FILE")
    add("--max-train-examples", type=int, metavar="N")
    add("--max-eval-examples", type=int, metavar="N")
    add("--max-seq-length", type=int)
    add("--eval-batch-size", type=int)
    _optim_and_run_flags(parser, defaults)
    group = parser.add_argument_group("length of training")
    add = _adder(group, "task", defaults)
    add("--epochs", type=float)
    add("--steps", type=int)


TRAINING_COMMANDS = {"pretrain": (PretrainConfig, _pretrain_flags), "finetune": (FinetuneConfig, _finetune_flags)}


def config_from_args(command: str, args: argparse.Namespace):
    """The PretrainConfig / FinetuneConfig the parsed flags describe (ValueError naming a bad flag)."""
    config_class = TRAINING_COMMANDS[command][0]
    given: dict[str, dict[str, Any]] = {"optim": {}, "run": {}, "task": {}}
    for dest, value in vars(args).items():
        section, _, field = dest.partition(".")
        if section in given and field:
            given[section][field] = value
    defaults = config_class()
    optim = dataclasses.replace(defaults.optim, **given["optim"]) if given["optim"] else defaults.optim
    run = dataclasses.replace(defaults.run, **given["run"]) if given["run"] else defaults.run
    return config_class(optim=optim, run=run, **given["task"])


# --- parsing and running -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="bertopt",
        description="Train BERT-style models with BERT's own optimization recipe.",
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = []
    for name, (_, add_flags) in TRAINING_COMMANDS.items():
        cmd = sub.add_parser(name, help=TRAINING_HELP[name], description=TRAINING_HELP[name])
        add_flags(cmd)
        commands.append(cmd)
    for name, module_name in OTHER_COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
        commands.append(cmd)
    for cmd in commands:
        # also accepted after the command name; SUPPRESS keeps a --debug given before it
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show Python tracebacks on errors")
    return parser


def _run_training(command: str, args: argparse.Namespace) -> int:
    from bertopt.train import command as skeleton

    return skeleton.run(command, config_from_args(command, args), debug=args.debug)


class _TerminateRaises:
    """While active, SIGTERM raises :class:`Terminated` in the main thread (Python's default would
    end the process without running ``finally`` blocks or saying why)."""

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Terminated()

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _TerminateRaises():
            if args.command in TRAINING_COMMANDS:
                return _run_training(args.command, args)
            return int(args._run(args) or 0)
    except (KeyboardInterrupt, Terminated) as exc:
        if args.debug:
            raise
        return report_stop(args.command, exit_code(exc))
    except Exception as exc:
        if args.debug:
            raise
        return report_error(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
