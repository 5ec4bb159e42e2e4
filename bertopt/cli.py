"""Command-line entry point: argument parsing only.

Each subcommand lives in its own module, which exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules keep heavy imports
(transformers, matplotlib) inside ``run`` so that ``bertopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "pretrain": "bertopt.train.pretrain",
    "finetune": "bertopt.train.finetune",
    "schedule": "bertopt.train.schedule_plot",
    "bench": "bertopt.bench.command",
    "study": "bertopt.study.command",
}

# Packages of the `train` extra: without them the training commands are not offered.
OPTIONAL_EXTRAS = {"transformers", "tokenizers", "matplotlib", "tqdm", "safetensors", "numpy"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertopt",
        description="Train BERT-style models with BERT's own optimization recipe.",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing optional extra hides a command; a broken import in our own code must show.
            if exc.name != module_name and (exc.name or "").split(".")[0] not in OPTIONAL_EXTRAS:
                raise
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
