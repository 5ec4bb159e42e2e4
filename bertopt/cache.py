"""Where bertopt caches what it builds: one root, one folder per kind.

The root is ``$BERTOPT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/bertopt`` (``~/.cache/bertopt``).
Under it, ``pretrain/`` holds the trainer's tokenizers and token ids, ``native/`` the compiled
optimizer kernels. ``BERTOPT_CACHE``, the trainer's older variable (the ``pretrain`` folder
itself, not the root), still works for that folder, with a warning that it is deprecated.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

VARIABLE = "BERTOPT_CACHE_DIR"
DEPRECATED_VARIABLE = "BERTOPT_CACHE"  # the pretrain folder itself; superseded by BERTOPT_CACHE_DIR
KINDS = ("pretrain", "native")

_warned = False


def cache_root() -> Path:
    root = os.environ.get(VARIABLE)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bertopt"


def cache_dir(kind: str) -> Path:
    """The folder for one kind of cached files (one of ``KINDS``); not created here."""
    if kind not in KINDS:
        raise ValueError(f"cache kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind == "pretrain" and os.environ.get(DEPRECATED_VARIABLE):
        _warn_deprecated()
        return Path(os.environ[DEPRECATED_VARIABLE])
    return cache_root() / kind


def _warn_deprecated() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    # FutureWarning, not DeprecationWarning: Python shows it to the people running the CLI.
    warnings.warn(f"{DEPRECATED_VARIABLE} is deprecated and will be removed: set {VARIABLE} to the cache root "
                  f"instead (the trainer's cache is its pretrain/ folder, {VARIABLE}/pretrain)",
                  FutureWarning, stacklevel=3)
