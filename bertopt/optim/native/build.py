"""Build the native kernels on first use, cache them, load them.

The C sources (``bertopt/optim/csrc``: ``bertopt.h``, ``pool.c``, ``norm.c``, ``adam.c``,
``lamb.c``) ship as package data and are compiled together into **one** shared library
(one thread pool) with the system compiler, the first time a kernel is needed (about a
second), into the per-user cache (``bertopt.cache``, its ``native/`` folder) keyed by a hash of the sources, compiler, flags and CPU.
``-march=native`` is tried first (this CPU's vector width), plain flags if the compiler
refuses; the file is installed atomically, so concurrent processes never load a partial
library. No Python or torch headers, nothing to build at install time.

At load, the library's ABI version and ``sizeof(bertopt_hyper)`` must equal those of the
Python mirror (``kernels.Hyper``): a cached file that disagrees is rebuilt once, and if
the sources themselves disagree with the mirror the kernels are refused with a warning
that says so (then torch's kernels run).

Without a compiler, on non-POSIX systems, or with ``BERTOPT_NATIVE=0`` in the environment,
:func:`library` returns None and the callers use torch's kernels; :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from bertopt.cache import cache_dir

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADERS = ("bertopt.h",)
SOURCES = ("pool.c", "norm.c", "adam.c", "lamb.c")
BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-fno-math-errno", "-ffp-contract=off",
              "-Werror=implicit-function-declaration", "-Werror=int-conversion",
              "-Werror=incompatible-pointer-types"]
LIBRARY_NAME = "bertopt_kernels"

_enabled = True


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared between machines stays correct."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + flags


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def find_compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc if cc and shutil.which(cc) else None


def source_text() -> str:
    """All C sources, for the cache key (a missing file raises OSError)."""
    return "\0".join((CSRC / name).read_text() for name in (*HEADERS, *SOURCES))


def compile_library(cc: str, out: Path, flags: list[str]) -> str | None:
    """Compile the C sources into ``out`` atomically; return an error message or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, "-I", str(CSRC), *[str(CSRC / s) for s in SOURCES], "-o", str(tmp_out),
                               "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return proc.stderr.strip()[-2000:] or f"{cc} exited with {proc.returncode}"
        os.replace(tmp_out, out)  # atomic: concurrent processes never load a partial file
    return None


def abi_mismatch(lib: ctypes.CDLL) -> str | None:
    """Why a loaded library does not fit the Python mirror of its struct, or None."""
    from bertopt.optim.native.kernels import ABI_VERSION, Hyper

    lib.bertopt_abi_version.restype = ctypes.c_int64
    lib.bertopt_hyper_size.restype = ctypes.c_int64
    version, size = lib.bertopt_abi_version(), lib.bertopt_hyper_size()
    if version != ABI_VERSION or size != ctypes.sizeof(Hyper):
        return (f"the C kernels have ABI version {version} and a {size}-byte bertopt_hyper, the Python side "
                f"(kernels.Hyper) version {ABI_VERSION} and {ctypes.sizeof(Hyper)} bytes")
    return None


def build_cached(cc: str) -> tuple[ctypes.CDLL | None, str]:
    """Compile (once: cached under a hash of sources, compiler, flags and CPU) and load.
    Returns (library, "loaded PATH") or (None, the errors)."""
    from bertopt.optim.native.kernels import declare

    version, source = _compiler_version(cc), source_text()
    errors = []
    for march in (["-march=native"], []):
        flags = BASE_FLAGS + march
        key = hashlib.sha256("\0".join([source, cc, version, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        path = cache_dir("native") / f"{LIBRARY_NAME}_{key}.so"
        for attempt in range(2):  # a cached file that does not fit is rebuilt once
            try:
                if not path.exists():
                    err = compile_library(cc, path, flags)
                    if err is not None:
                        errors.append(err)
                        break
                lib = ctypes.CDLL(str(path))
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                break
            mismatch = abi_mismatch(lib)
            if mismatch is None:
                declare(lib)
                return lib, f"loaded {path}"
            if attempt == 0:
                path.unlink(missing_ok=True)
                continue
            warnings.warn(f"bertopt: native kernels refused, {mismatch}; using torch's kernels", RuntimeWarning,
                          stacklevel=2)
            return None, f"ABI mismatch: {mismatch}"
    return None, " | ".join(errors)


def variant_library(directory: Path, defines: dict[str, object]) -> ctypes.CDLL:
    """The kernels compiled with extra ``-D`` macros (``{"NORM_STREAMS": 8}``), into ``directory``
    (not cached), checked and declared like the shipped library. Benchmarks time such variants
    against it; the sources say which macros they read. Raises RuntimeError if it cannot build."""
    from bertopt.optim.native.kernels import declare

    cc = find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    macros = [f"-D{name}={value}" for name, value in defines.items()]
    out = Path(directory) / f"{LIBRARY_NAME}_{'_'.join(f'{k}{v}' for k, v in defines.items())}.so"
    err = compile_library(cc, out, [*BASE_FLAGS, "-march=native", *macros])
    if err is not None:
        raise RuntimeError(f"compiling the kernels with {' '.join(macros)} failed: {err}")
    lib = ctypes.CDLL(str(out))
    mismatch = abi_mismatch(lib)
    if mismatch is not None:
        raise RuntimeError(mismatch)
    declare(lib)
    return lib


def _build_and_load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("BERTOPT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by BERTOPT_NATIVE=0"
    if os.name != "posix":
        return None, f"not built on {os.name} (needs a POSIX C compiler and pthreads)"
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install gcc/clang)"
    try:
        lib, message = build_cached(cc)
    except OSError as exc:  # the sources are missing (a broken install)
        return None, f"compiling the native kernel failed: C sources not readable ({exc})"
    if lib is None:
        return None, "compiling the native kernel failed: " + message
    return lib, message


class _BuiltOnce:
    """The library, built on first use, once per process (thread-safe), and why it is or is not there."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.lib, self.status, self._tried = None, "not loaded yet", False

    def get(self) -> ctypes.CDLL | None:
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self.lib, self.status = _build_and_load()
                    self._tried = True
        return self.lib


_library = _BuiltOnce()


def use_native(enabled: bool) -> bool:
    """Switch the native kernels on or off in this process (to compare paths); returns the old setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; None if unavailable (see :func:`status`)."""
    return _library.get() if _enabled else None


def status() -> str:
    """Why the native kernels are or are not in use ("loaded PATH" when they are)."""
    if not _enabled:
        return "switched off with use_native(False)"
    _library.get()
    return _library.status


def reset_for_tests() -> None:
    """Forget the loaded library so the next call re-reads the environment (tests only)."""
    _library.reset()
