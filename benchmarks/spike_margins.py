"""How close healthy runs come to the --on-spike thresholds: replay the detector over the per-step
losses and gradient norms of finished runs (``bertopt pretrain ... --log-every 1``).

    python benchmarks/spike_margins.py runs/default/metrics.jsonl runs/lamb/metrics.jsonl

For each run: the largest loss rise over the recent median in MADs and as a fraction of the median,
the largest gradient-norm ratio to its recent median (each over the steps the detector judges), the
step where each happened, and the false alarms at the default thresholds (the detector as the
loop runs it: spikes would be rewound, so here they are only counted and left out of the level).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bertopt.train.config import RunConfig
from bertopt.train.report import read_metrics
from bertopt.train.spike import MIN_HISTORY, SpikeState, median_and_mad


def margins(path: Path, config: RunConfig) -> dict:
    records = [r for r in read_metrics(path) if isinstance(r.get("loss"), (int, float)) and r["step"] > 0]
    steps = [r["step"] for r in records]
    if steps != list(range(1, len(steps) + 1)):
        raise SystemExit(f"{path}: needs a record for every step (--log-every 1)")
    state, worst, alarms = SpikeState(), {"mads": (0.0, 0), "rise": (0.0, 0), "grad": (0.0, 0)}, []
    for r in records:
        loss, norm = float(r["loss"]), float(r["grad_norm"])
        if len(state.losses) >= min(config.spike_window, MIN_HISTORY) and math.isfinite(loss):
            level, spread = median_and_mad(state.losses)
            norm_level = median_and_mad(state.norms)[0]
            for key, value in (("mads", (loss - level) / spread if spread > 0 else 0.0),
                               ("rise", (loss - level) / level), ("grad", norm / norm_level)):
                worst[key] = max(worst[key], (value, r["step"]))
        verdict = state.judge(r["step"], loss, norm, window=config.spike_window, loss_mads=config.spike_loss_mads,
                              min_rise=config.spike_min_rise, grad_ratio=config.spike_grad_ratio,
                              patience=config.spike_patience)
        if verdict.spike:
            alarms.append({"step": r["step"], "reason": verdict.reason})
    return {"run": str(path), "steps": len(records),
            "max_loss_rise_in_mads": [round(worst["mads"][0], 2), worst["mads"][1]],
            "max_loss_rise_over_median": [round(worst["rise"][0], 3), worst["rise"][1]],
            "max_grad_norm_ratio": [round(worst["grad"][0], 2), worst["grad"][1]],
            "false_alarms_at_defaults": alarms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=RunConfig.spike_window)
    parser.add_argument("--patience", type=int, default=RunConfig.spike_patience)
    args = parser.parse_args()
    config = RunConfig(spike_window=args.window, spike_patience=args.patience)
    for path in args.metrics:
        print(json.dumps(margins(path, config)))


if __name__ == "__main__":
    main()
