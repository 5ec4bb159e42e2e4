"""Shared pieces of the fault tests: a tiny corpus, the flags of a tiny `bertopt pretrain` run,
curve comparison, and a launcher of real training processes that can be killed.

Launching ``python -m bertopt`` costs ~5 s of imports (torch, transformers) on the 2-core test
machine, which would make ten kills take minutes. :class:`Launcher` instead starts one fork
server (``multiprocessing``'s ``forkserver``) that imports everything once; each training run is
then a fresh process forked from it, running ``bertopt.cli.main(argv)`` exactly like the console
script, that can be killed with SIGKILL, SIGINT or SIGTERM like any other process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import pytest

from bertopt.train import checkpoint as ckpt
from bertopt.train.report import read_metrics

# --- corpus and flags ---------------------------------------------------------------------------

_WORDS = ("river stone light garden window bridge market winter summer teacher sister doctor "
          "painter village forest letter morning evening kitchen mountain").split()
_VERBS = "sees finds paints carries follows watches remembers opens".split()


def write_corpus(directory: Path, *, documents: int = 160, seed: int = 0) -> Path:
    """Documents (blocks separated by blank lines) of simple sentences, in two .txt files."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(documents):
        sentences = [f"The {rng.choice(_WORDS)} {rng.choice(_VERBS)} the {rng.choice(_WORDS)} near the "
                     f"{rng.choice(_WORDS)}." for _ in range(5)]
        docs.append(" ".join(sentences) + f" This is note {i}.")
    for part in range(2):
        (directory / f"part{part}.txt").write_text("\n\n".join(docs[part::2]) + "\n", encoding="utf-8")
    return directory


def pretrain_argv(corpus: Path, cache: Path, out: Path, *extra: str, steps: int = 12, save_every: int = 3,
                  log_every: int = 2, eval_every: int = 6) -> list[str]:
    """A nano BERT on the tiny corpus, one thread, no progress bar; ``extra`` flags go last."""
    return ["pretrain", "--preset", "nano", "--corpus", str(corpus), "--cache-dir", str(cache),
            "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3",
            "--steps", str(steps), "--log-every", str(log_every), "--eval-every", str(eval_every),
            "--save-every", str(save_every), "--keep-checkpoints", "2", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


# --- curves -------------------------------------------------------------------------------------

CURVE_KEYS = ("loss", "lr", "grad_norm", "eval_loss", "eval_accuracy", "train_accuracy", "skipped_steps")


def curve(out: Path) -> list[dict]:
    """The deterministic part of metrics.jsonl (no timings), one dict per record."""
    return [{"step": r["step"], **{k: r[k] for k in CURVE_KEYS if k in r}} for r in read_metrics(out / "metrics.jsonl")]


def assert_same_curve(got: list[dict], expected: list[dict], *, rel: float = 1e-6) -> None:
    """Same records at the same steps, every value equal to ``rel`` (in practice bit-identical)."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-12), (key, a, b)


def assert_prefix_of(got: list[dict], expected: list[dict], *, rel: float = 1e-6) -> None:
    """``got`` is the first len(got) records of ``expected``."""
    assert len(got) <= len(expected)
    assert_same_curve(got, expected[:len(got)], rel=rel)


def assert_verified_checkpoint(out: Path) -> ckpt.LoadedCheckpoint:
    """The newest checkpoint in <out>/checkpoints verifies (and none was passed over as damaged)."""
    loaded = ckpt.load_checkpoint(out / "checkpoints")
    assert loaded.skipped == [], loaded.skipped
    return loaded


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# --- real processes -----------------------------------------------------------------------------

PRELOAD = ["_faults", "bertopt.cli", "bertopt.train.pretrain", "bertopt.train.loop", "bertopt.train.data",
           "bertopt.train.report", "bertopt.train.checkpoint", "bertopt.optim", "numpy", "tokenizers",
           "transformers", "transformers.models.bert.modeling_bert", "matplotlib.pyplot", "tqdm.auto",
           "safetensors.torch", "torch.distributed.checkpoint.state_dict"]


def _create_tqdm_lock_before_forking() -> None:
    """tqdm creates a multiprocessing lock (a named semaphore) in each process that draws a bar;
    made here, in the fork server, the children share it instead of leaking one per kill."""
    from tqdm.std import tqdm

    tqdm.get_lock()


_create_tqdm_lock_before_forking()


def _run_cli(argv: list[str], log_path: str) -> None:
    """Body of a launched process: ``bertopt <argv>`` with stdout and stderr going to ``log_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from bertopt.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit work in a forked child


class Launcher:
    """Start ``bertopt`` processes from a fork server that has imported everything once."""

    def __init__(self):
        if "forkserver" not in multiprocessing.get_all_start_methods():
            pytest.skip("needs multiprocessing's forkserver start method (Linux, macOS)")
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)

    def start(self, argv: list[str], log_path: Path) -> multiprocessing.Process:
        process = self.context.Process(target=_run_cli, args=(argv, str(log_path)), daemon=True)
        process.start()
        return process

    def run(self, argv: list[str], log_path: Path, timeout: float = 120) -> int:
        process = self.start(argv, log_path)
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise AssertionError(f"bertopt {' '.join(argv)} did not finish in {timeout} s; log: {log_path}")
        return process.exitcode


def wait_for(condition, *, timeout: float, process: multiprocessing.Process | None = None, poll: float = 0.005) -> bool:
    """Poll ``condition()`` until it is true (True), the process ended or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.exitcode is not None:
            return bool(condition())
        time.sleep(poll)
    return False


def latest_step(out: Path) -> int:
    """Step of the newest checkpoint manifest in <out>/checkpoints, -1 if there is none."""
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    return latest.step if latest else -1
