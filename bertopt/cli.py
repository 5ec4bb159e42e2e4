"""Command-line entry point: argument parsing, and how errors reach the user.

Each subcommand lives in its own module, which exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules keep heavy imports
(transformers, matplotlib) inside ``run`` so that ``bertopt --help`` stays fast.

Errors: whatever a command does not handle itself ends here as one paragraph on stderr and an
exit code (:data:`EXIT_CODES`), never a Python traceback unless ``--debug`` is given (before or
after the command name). Ctrl-C and SIGTERM outside the training steps (data preparation, model
building, the final report) stop the command with 130 / 143; during the training steps the loop
handles them itself (checkpoint, then the same exit codes).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import threading

COMMANDS = {
    "pretrain": "bertopt.train.pretrain",
    "finetune": "bertopt.train.finetune",
    "schedule": "bertopt.train.schedule_plot",
    "bench": "bertopt.bench.command",
    "study": "bertopt.study.command",
}

# Packages of the `train` extra: without them the training commands are not offered.
OPTIONAL_EXTRAS = {"transformers", "tokenizers", "matplotlib", "tqdm", "safetensors", "numpy"}

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_FAILED: "failed (the message says why; checkpoints already written are intact)",
    EXIT_USAGE: "bad input: a flag, a file or the data (nothing was trained)",
    EXIT_SIGINT: "stopped by Ctrl-C (SIGINT)",
    EXIT_SIGTERM: "stopped by SIGTERM (e.g. preemption)",
}


class Terminated(BaseException):
    """SIGTERM arrived outside the training steps (a BaseException, like KeyboardInterrupt, so
    that ``except Exception`` in library code does not swallow it)."""


# --- one-paragraph errors -----------------------------------------------------------------------

_OS_ERROR_ADVICE = {
    errno.ENOSPC: "the disk is full: free space on that filesystem (or choose another --out), then run the "
                  "same command again; add --resume to continue from the last checkpoint",
    errno.EDQUOT: "the disk quota is exhausted: free space (or choose another --out), then run the same "
                  "command again; add --resume to continue from the last checkpoint",
    errno.EACCES: "permission denied: choose a directory you can write to (--out, --cache-dir) or fix its permissions",
    errno.EPERM: "the operation is not permitted there (permissions, or an immutable file): choose another "
                 "directory (--out, --cache-dir)",
    errno.EROFS: "the filesystem is read-only: choose a writable directory (--out, --cache-dir)",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose another path",
    errno.EEXIST: "a file is in the way of a directory: choose another path or remove the file",
    errno.ENOENT: "the path does not exist: check it",
    errno.EISDIR: "a directory is where a file was expected: check the path",
}


def explain(exc: BaseException) -> str:
    """The message of ``exc`` as one paragraph, with what to do for operating-system errors."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERROR_ADVICE:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}: {_OS_ERROR_ADVICE[exc.errno]}"
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError)) and not _is_bertopt_error(exc):
        # not an error bertopt raises on purpose: say so, and how to see where it came from
        text = (f"unexpected {type(exc).__name__}: {text}. This is probably a bug in bertopt (or an unusual "
                "environment); run again with --debug to see the Python traceback, and report it")
    return text


def _is_bertopt_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("bertopt.")


def exit_code(exc: BaseException) -> int:
    """EXIT_USAGE for bad input (ValueError and subclasses), EXIT_FAILED for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, Terminated):
        return EXIT_SIGTERM
    return EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED


def report_error(command: str, exc: BaseException) -> int:
    """Print ``exc`` as ``bertopt <command>: error: <one paragraph>`` on stderr; return the exit code."""
    print(f"bertopt {command}: error: {explain(exc)}", file=sys.stderr, flush=True)
    return exit_code(exc)


def run_training_command(command: str, main, args) -> int:
    """``main(args)`` of a training command as an exit code: its errors reported as one paragraph
    (ValueError: bad input, 2; anything else: failed, 1; raised with --debug), else 0 when done
    or 130/143 when it stopped on SIGINT/SIGTERM after saving a checkpoint (``stopped_by``).
    Callers that are not :func:`main` (the study runs commands in-process) get a code too."""
    try:
        summary = main(args)
    except Exception as exc:
        if getattr(args, "debug", False):
            raise
        return report_error(command, exc)
    return {None: EXIT_OK, "SIGINT": EXIT_SIGINT}.get(summary.get("stopped_by"), EXIT_SIGTERM)


def _report_stop(command: str, code: int) -> int:
    name = "Ctrl-C (SIGINT)" if code == EXIT_SIGINT else "SIGTERM"
    print(f"bertopt {command}: stopped by {name} without saving the current state (it came before or after "
          "the training steps, or was a second Ctrl-C); checkpoints already written are intact. Run the same "
          "command again, with --resume to continue from the last checkpoint if there is one.",
          file=sys.stderr, flush=True)
    return code


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


# --- parsing ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bertopt",
        description="Train BERT-style models with BERT's own optimization recipe.",
        epilog="exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
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
        # also accepted after the command name; SUPPRESS keeps a --debug given before it
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show Python tracebacks on errors")
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _TerminateRaises():
            return int(args._module.run(args) or 0)
    except (KeyboardInterrupt, Terminated) as exc:
        if args.debug:
            raise
        return _report_stop(args.command, exit_code(exc))
    except Exception as exc:
        if args.debug:
            raise
        return report_error(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
