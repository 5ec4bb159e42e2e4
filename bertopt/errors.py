"""How errors reach the user: one paragraph and an exit code, never a traceback (unless --debug).

Shared by the command line (:mod:`bertopt.cli`) and the training command skeleton
(:mod:`bertopt.train.command`), which reports the errors of a run it was handed directly.
"""

from __future__ import annotations

import errno
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_CODES = {
    EXIT_OK: "done",
    EXIT_FAILED: "failed (the message says why; checkpoints already written are intact)",
    EXIT_USAGE: "bad input: a flag, a file or the data (nothing was trained)",
    EXIT_SIGINT: "stopped by Ctrl-C (SIGINT)",
    EXIT_SIGTERM: "stopped by SIGTERM (e.g. preemption)",
}


class UsageError(ValueError):
    """A problem with how the command was called (exit code 2)."""


class MissingExtra(RuntimeError):
    """An optional dependency of a command is not installed (the message has the pip line)."""


class Terminated(BaseException):
    """SIGTERM arrived outside the training steps (a BaseException, like KeyboardInterrupt, so
    that ``except Exception`` in library code does not swallow it)."""


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

# The packages of the `train` extra (pyproject.toml), by import name.
TRAIN_EXTRA = ("transformers", "tokenizers", "safetensors", "tqdm", "matplotlib", "numpy")
TRAIN_EXTRA_INSTALL = "pip install 'bertopt[train]'"


def missing_extra_message(command: str, missing: list[str]) -> str:
    return (f"bertopt {command} needs the packages of bertopt's `train` extra, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {TRAIN_EXTRA_INSTALL}")


def explain(exc: BaseException) -> str:
    """The message of ``exc`` as one paragraph, with what to do for operating-system errors."""
    if isinstance(exc, OSError) and exc.errno in _OS_ERROR_ADVICE:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}: {_OS_ERROR_ADVICE[exc.errno]}"
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in TRAIN_EXTRA:
        return (f"the package {exc.name.split('.')[0]} is not installed; it belongs to bertopt's `train` extra: "
                f"{TRAIN_EXTRA_INSTALL}")
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, (ValueError, OSError)) and not type(exc).__module__.startswith("bertopt."):
        # not an error bertopt raises on purpose: say so, and how to see where it came from
        text = (f"unexpected {type(exc).__name__}: {text}. This is probably a bug in bertopt (or an unusual "
                "environment); run again with --debug to see the Python traceback, and report it")
    return text


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


def report_stop(command: str, code: int) -> int:
    name = "Ctrl-C (SIGINT)" if code == EXIT_SIGINT else "SIGTERM"
    print(f"bertopt {command}: stopped by {name} without saving the current state (it came before or after "
          "the training steps, or was a second Ctrl-C); checkpoints already written are intact. Run the same "
          "command again, with --resume to continue from the last checkpoint if there is one.",
          file=sys.stderr, flush=True)
    return code
