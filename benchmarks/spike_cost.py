"""What ``--on-spike rewind`` costs a healthy run: training throughput with the guard on and off.

    python benchmarks/spike_cost.py --rounds 5 --steps 200

Interleaved rounds (off, on, off, on, ...), each a fresh ``bertopt pretrain`` process (the default
BERT-tiny run, shortened), compared by the training time of its steps (summary.json's
``train_time_s``: the steps only, no evaluation or start-up): the median of the per-round ratios
on/off. Also the detector's own time per step (``SpikeState.judge`` with a full window), and the
one checkpoint the guard writes before the first step. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertopt.train.spike import SpikeState


def train_time(out: Path, steps: int, guard: str, threads: int) -> tuple[float, float]:
    """(seconds of the training steps, wall seconds of the whole command) of one run."""
    # thresholds out of reach: a rewind would repeat steps; judging costs the same at any threshold
    # (the short schedule's steep warmup makes gradient-norm spikes that the defaults would rewind)
    argv = [sys.executable, "-m", "bertopt", "pretrain", "--steps", str(steps), "--eval-every", "0",
            "--save-every", "0", "--no-progress", "--threads", str(threads), "--on-spike", guard,
            "--spike-grad-ratio", "1e9", "--spike-loss-mads", "1e9", "--out", str(out)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return summary["train_time_s"], summary["wall_time_s"]


def judge_seconds(window: int = 100, calls: int = 20000) -> float:
    state, options = SpikeState(), dict(window=window, loss_mads=12.0, min_rise=0.25, grad_ratio=20.0)
    for step in range(window):
        state.judge(step + 1, 6.0 + 0.01 * (step % 7), 1.0 + 0.01 * (step % 5), **options)
    started = time.perf_counter()
    for step in range(calls):
        state.judge(window + step + 1, 6.0 + 0.01 * (step % 7), 1.0 + 0.01 * (step % 5), **options)
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3] if os.path.exists("/proc/loadavg") else None
    times, walls = {"off": [], "rewind": []}, {"off": [], "rewind": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for guard in ("off", "rewind") if i % 2 == 0 else ("rewind", "off"):
                seconds, wall = train_time(Path(tmp) / f"{guard}{i}", args.steps, guard, args.threads)
                times[guard].append(seconds)
                walls[guard].append(wall)
    ratios = [on / off for on, off in zip(times["rewind"], times["off"])]
    judge = judge_seconds()
    step = statistics.median(times["off"]) / args.steps
    print(json.dumps({
        "steps": args.steps, "rounds": args.rounds, "train_time_s": times,
        "ratio_on_over_off_per_round": [round(r, 4) for r in ratios],
        "median_ratio_on_over_off": round(statistics.median(ratios), 4),
        "wall_time_s": walls,
        "median_wall_ratio_on_over_off": round(statistics.median(
            [on / off for on, off in zip(walls["rewind"], walls["off"])]), 4),
        "judge_us_per_step": round(judge * 1e6, 2), "step_ms_off": round(step * 1e3, 2),
        "judge_share_of_a_step": round(judge / step, 6),
        "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
    }))


if __name__ == "__main__":
    main()
