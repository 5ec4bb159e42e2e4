"""Run ``python -m bertopt ...`` under torchrun with 2 CPU processes (gloo), one thread each."""

from __future__ import annotations

import os
import subprocess
import sys

from bertopt.train.report import read_metrics


def torchrun(args: list[str], out) -> tuple[list[dict], str]:
    """``(metrics.jsonl records, stdout)`` of the run; asserts that it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bertopt", *args, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return read_metrics(out / "metrics.jsonl"), proc.stdout
