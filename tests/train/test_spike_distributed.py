"""--on-spike rewind under torchrun (2 CPU processes, gloo): every rank judges from the all-reduced
loss and the global gradient norm, so both take the rewind that one process takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _corpus import write_corpus
from bertopt.train.report import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SCRIPT = str(Path(__file__).with_name("_poisoned_bertopt.py"))
POISON = "13,14"  # 0-based data steps: optimizer steps 14-15 read them; the spike is caught at 15


def _run(args, out, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    proc = subprocess.run([*(launcher if processes > 1 else [sys.executable]), SCRIPT, POISON, *args, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return read_metrics(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The arguments, and the one-process run they make."""
    base = tmp_path_factory.mktemp("spike-distributed")
    config = base / "no-dropout.json"  # dropout draws differ per process; switch it off to compare
    config.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    args = ["pretrain", "--config", str(config), "--corpus", str(write_corpus(base / "text", documents=200)),
            "--cache-dir", str(base / "cache"), "--vocab-size", "300", "--seq-len", "32", "--batch-size", "8",
            "--steps", "20", "--lr", "3e-3", "--log-every", "1", "--eval-every", "0", "--save-every", "4",
            "--threads", "1", "--no-progress", "--on-spike", "rewind", "--spike-window", "10"]
    return args, base, *_run(args, base / "one", 1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_take_the_rewind_of_one(one, mode):
    args, base, records, summary = one
    two, two_summary = _run([*args, *(["--fsdp"] if mode == "fsdp" else [])], base / mode, 2)
    [event] = summary["rewinds"]
    assert (event["detected_step"], event["restored_step"], event["skipped_data_steps"]) == (15, 12, [13, 15])
    assert [{k: v for k, v in e.items() if k != "reason"} for e in two_summary["rewinds"]] == \
        [{k: v for k, v in event.items() if k != "reason"}]
    assert [r["step"] for r in two] == [r["step"] for r in records]
    for got, want in zip(two, records):  # float32 sums over 2 processes: equal to rounding (<= 5e-7 measured)
        for key in ("loss", "grad_norm", "lr", "eval_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (key, got, want)
