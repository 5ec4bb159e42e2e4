"""Atomic, verified checkpoints.

A checkpoint is two files in one directory::

    step-00000200-<nonce>.pt   the payload: ``torch.save`` of a dict of tensors and plain values
    step-00000200.json         the manifest: step, payload file name, its size and sha256, metadata

The payload is written first, the manifest last; both go to a temporary file in the same directory,
are fsync'ed and then renamed over their final name (``os.replace`` is atomic on POSIX), and the
directory is fsync'ed. So a checkpoint either has a manifest whose checksum matches its payload, or
it does not exist. A process killed at any moment (SIGKILL mid-save, power cut) leaves the previous
checkpoints untouched: older checkpoints are pruned only after the new manifest is in place.
The payload name carries a random nonce so that re-saving the same step never overwrites the
payload a valid manifest still points to.

Loading verifies size and sha256 before unpickling, and unpickles with ``weights_only=True``
(tensors, numbers, strings, lists, tuples, dicts only), so a corrupt or foreign file is refused
with a :class:`CheckpointError` instead of crashing or executing code.

The same safe-writing rules serve the rest of a run directory: :func:`atomic_write_bytes` (files),
:func:`export_atomically` (the exported model directory) and :func:`ensure_writable_dir` (proof that
``--out`` / ``--cache-dir`` can be written before any work).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bertopt.errors import UsageError

FORMAT_VERSION = 1
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, truncated or does not belong to this run."""


# --- atomic files -------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems / platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter(io.RawIOBase):
    """A write-only file object that hashes and counts what passes through it, and remembers the
    OSError of a failed write (torch.save's zip writer turns it into a RuntimeError)."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        try:
            self.raw.write(view)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes


def atomic_write(path: str | os.PathLike, write: Callable[[io.RawIOBase], None]) -> tuple[str, int]:
    """Create ``path`` atomically: ``write(fileobj)`` fills a temporary file in the same directory,
    which is fsync'ed and renamed over ``path``. Returns (sha256 hex, size in bytes).

    If anything fails (or the process dies) ``path`` keeps its old content, and the temporary
    file is removed (or, after a kill, left behind as ``.<name>.tmp-*`` for :func:`save_checkpoint`
    to clean up).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            try:
                write(writer)
            except Exception as exc:
                if writer.error is not None and exc is not writer.error:
                    # the disk's own error (e.g. ENOSPC), not the wrapper a serializer made of it
                    raise writer.error from exc
                raise
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return writer.sha256.hexdigest(), writer.size


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> tuple[str, int]:
    """Atomically replace ``path`` with ``data``; see :func:`atomic_write`."""
    return atomic_write(path, lambda f: f.write(data))


def ensure_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if needed and prove it writable by creating and removing a file in it (more
    reliable than ``os.access``, which says yes to root on read-only or immutable directories).
    UsageError naming the flag, before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bertopt-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise UsageError(f"{flag} {path}: cannot write there ({reason}); choose a directory you can write to") from None


def export_atomically(write: Callable[[Path], None], directory: Path) -> Path:
    """``write(tmp)`` into a temporary sibling directory, then replace ``directory`` with it, so a
    crash leaves the old directory or the new one, never half of one."""
    import shutil

    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- checkpoints ----------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """One checkpoint found on disk (its manifest has been parsed, not yet verified)."""

    step: int
    manifest_path: Path
    payload_path: Path
    sha256: str
    size: int
    meta: dict[str, Any] = field(default_factory=dict)


def _manifest_name(step: int) -> str:
    return f"step-{step:08d}.json"


def _read_manifest(path: Path) -> CheckpointInfo:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {manifest.get('format')!r}, this bertopt reads {FORMAT_VERSION}"
            )
        return CheckpointInfo(
            step=int(manifest["step"]),
            manifest_path=path,
            payload_path=path.with_name(manifest["file"]),
            sha256=str(manifest["sha256"]),
            size=int(manifest["bytes"]),
            meta=dict(manifest.get("meta") or {}),
        )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint manifest ({exc})") from exc


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointInfo]:
    """Checkpoints in ``directory`` with a readable manifest, oldest first (not verified)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("step-*.json")):
        try:
            found.append(_read_manifest(path))
        except CheckpointError:
            continue
    return sorted(found, key=lambda c: c.step)


def verify_checkpoint(info: CheckpointInfo) -> None:
    """Raise :class:`CheckpointError` unless the payload exists with the recorded size and sha256."""
    path = info.payload_path
    if not path.exists():
        raise CheckpointError(f"{info.manifest_path}: its payload {path.name} is missing")
    size = path.stat().st_size
    if size != info.size:
        raise CheckpointError(
            f"{path}: truncated or altered ({size} bytes on disk, {info.size} bytes when saved)"
        )
    digest = file_sha256(path)
    if digest != info.sha256:
        raise CheckpointError(f"{path}: checksum mismatch (sha256 {digest[:12]}…, saved as {info.sha256[:12]}…)")


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    *,
    meta: dict[str, Any] | None = None,
    keep: int = 2,
) -> CheckpointInfo:
    """Save ``state`` (a dict for ``torch.save``) as the checkpoint of ``step``, atomically.

    ``meta`` (plain JSON values) goes into the manifest, readable without loading the payload.
    After the new checkpoint is complete, all but the ``keep`` newest checkpoints are deleted
    (``keep=0`` keeps all), together with leftovers of saves that were killed.
    """
    import torch

    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps every checkpoint), got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = directory / f"step-{step:08d}-{secrets.token_hex(4)}.pt"
    sha256, size = atomic_write(payload, lambda f: torch.save(state, f))
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "file": payload.name,
        "bytes": size,
        "sha256": sha256,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "meta": meta or {},
    }
    manifest_path = directory / _manifest_name(step)
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    info = _read_manifest(manifest_path)
    _prune(directory, keep)
    return info


def _prune(directory: Path, keep: int) -> None:
    checkpoints = list_checkpoints(directory)
    doomed = checkpoints[:-keep] if keep else []
    for info in doomed:  # manifest first: a half-pruned checkpoint is simply absent
        info.manifest_path.unlink(missing_ok=True)
        info.payload_path.unlink(missing_ok=True)
    live = {c.payload_path.name for c in checkpoints[len(doomed):]}
    for path in directory.glob("step-*.pt"):
        if path.name not in live:  # payload of a killed save or of a re-saved step
            path.unlink(missing_ok=True)
    for path in directory.glob(".step-*.tmp-*"):
        path.unlink(missing_ok=True)


@dataclass
class LoadedCheckpoint:
    state: dict[str, Any]
    info: CheckpointInfo
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were passed over


def _load_payload(info: CheckpointInfo, map_location) -> dict[str, Any]:
    import pickle

    import torch

    verify_checkpoint(info)
    try:
        return torch.load(info.payload_path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{info.payload_path}: cannot be read as a checkpoint ({exc})") from exc


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> LoadedCheckpoint:
    """Load a verified checkpoint.

    ``path`` may be a checkpoint directory (the newest checkpoint that verifies is loaded; the
    reasons newer ones were skipped are in ``.skipped``), a manifest ``step-*.json`` or a payload
    ``step-*.pt`` (exactly that checkpoint, or :class:`CheckpointError`).
    """
    path = Path(path)
    if path.is_dir():
        candidates = list_checkpoints(path)
        if not candidates:
            raise CheckpointError(f"{path}: no checkpoint found (expected step-*.json manifests)")
        skipped = []
        for info in reversed(candidates):
            try:
                return LoadedCheckpoint(_load_payload(info, map_location), info, skipped)
            except CheckpointError as exc:
                skipped.append(str(exc))
        raise CheckpointError(
            f"{path}: every checkpoint failed verification:\n  " + "\n  ".join(skipped)
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if path.suffix == ".pt":
        matches = [c for c in list_checkpoints(path.parent) if c.payload_path.name == path.name]
        if not matches:
            raise CheckpointError(f"{path}: no manifest points to this payload, so it cannot be verified")
        info = matches[0]
    else:
        info = _read_manifest(path)
    return LoadedCheckpoint(_load_payload(info, map_location), info)


def latest_checkpoint(directory: str | os.PathLike) -> CheckpointInfo | None:
    """The newest checkpoint in ``directory`` by manifest (not verified), or None."""
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_model_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_state_dict, run_info)`` of a verified training checkpoint (file or directory, as in
    :func:`load_checkpoint`). Keys are parameter names of the unwrapped model (no ``module.``
    prefix). For a ``bertopt pretrain`` checkpoint, ``run_info["model_config"]`` is the
    ``BertConfig`` as a dict and ``run_info["tokenizer"]`` the tokenizer file it was trained with.
    """
    loaded = load_checkpoint(path)
    return loaded.state["model"], dict(loaded.info.meta.get("run", {}))


# --- what a training checkpoint holds ---------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global) and torch RNG states as plain values and tensors (weights_only-safe)."""
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (str(name), keys.tolist(), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_training_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter names.

    Works for plain modules, DDP and FSDP2 alike (collective under FSDP2: call on every rank;
    ranks other than 0 may receive empty dicts), so a checkpoint saved by N processes can be
    resumed by M processes, or by one.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def get_model_state(model) -> dict:
    """Full (unsharded, CPU) model state dict keyed by parameter names; see :func:`get_training_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def set_training_state(model, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    """Load state dicts from :func:`get_training_state` into a (possibly wrapped) model/optimizer
    (``optimizer=None``: the model only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, model_state, options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=options)


RESUME_ADVICE = ("--resume takes a checkpoints directory (the newest checkpoint that verifies is used), a "
                 "step-*.json manifest or the step-*.pt payload a manifest names; --resume alone uses "
                 "<out>/checkpoints. To start from scratch instead, leave --resume out")


def _describe_difference(saved: dict, current: dict) -> str:
    """``hidden_size: 64 in the checkpoint, 128 in this run`` for the fields that differ."""
    keys = sorted(set(saved) | set(current), key=str)
    diffs = [f"{k}: {saved.get(k, '(absent)')!r} in the checkpoint, {current.get(k, '(absent)')!r} in this run"
             for k in keys if saved.get(k, "(absent)") != current.get(k, "(absent)")]
    return "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def check_compatible(meta: dict, run_info: dict, must_match: tuple[str, ...], where: Path) -> None:
    """CheckpointError unless the checkpoint was made by the same command with the same settings
    (``must_match``, keys of ``run_info``). A setting the checkpoint does not record at all means it
    was written by another command or program: refused too, unless this run leaves it unset (None)."""
    saved = meta.get("run", {})
    advice = "resume with the same settings, or start a new run in another --out directory"
    for key in ("command", *must_match):
        if key not in run_info:
            continue
        current = run_info[key]
        if key not in saved:
            if current is None:
                continue
            raise CheckpointError(
                f"{where}: the checkpoint does not record {key} (this run has {key}={current!r}), so it was "
                f"written by another command or program and cannot be continued here; {advice}"
            )
        if saved[key] != current:
            if isinstance(saved[key], dict) and isinstance(current, dict):
                difference = f"a different {key} ({_describe_difference(saved[key], current)})"
            else:
                difference = f"{key}={saved[key]!r} but this run has {key}={current!r}"
            raise CheckpointError(f"{where}: the checkpoint was made with {difference}; {advice}")
