"""Each bertopt.compat drop-in against the original it replaces, from a `bertopt bench` bench.json.

    python benchmarks/results/compat/ratios.py [benchmarks/results/compat/bench.json]

Prints, per pair, the ratio of the medians (original / drop-in) and the median of the
per-round ratios (both ran in the same interleaved rounds, so a slow spell of the shared
machine hits both sides of a pair), as a markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PAIRS = [
    ("transformers-adamw", "compat-adamw", "transformers 4.49 `AdamW` -> `bertopt.compat.AdamW` (each after torch's `clip_grad_norm_`)"),
    ("transformers-adamw-step", "compat-adamw-step", "transformers 4.49 `AdamW` -> `bertopt.compat.AdamW` (`step()` alone)"),
    ("ppb-bertadam", "compat-bertadam", "pytorch-pretrained-bert 0.6.2 `BertAdam` -> `bertopt.compat.BertAdam`"),
]


def ratios(report: dict) -> list[dict]:
    rows = []
    for size in report["sizes"]:
        methods = size["methods"]
        for original, drop_in, label in PAIRS:
            if original not in methods or drop_in not in methods:
                continue
            a, b = methods[original], methods[drop_in]
            rows.append({
                "size": size["size"], "pair": label,
                "original_ms": a["median_s"] * 1e3, "drop_in_ms": b["median_s"] * 1e3,
                "speedup": a["median_s"] / b["median_s"],
                "speedup_paired": statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"])),
                "reps": (a["reps"], b["reps"]),
            })
    return rows


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else Path(__file__).with_name("bench.json"))
    report = json.loads(path.read_text())
    load = report["meta"]["load"]
    print(f"{report['meta']['command']}  (commit {report['meta']['git_commit']}, {report['meta']['threads']} threads)")
    print(f"load average before {load['loadavg_before']}, after {load['loadavg_after']}; "
          f"other processes took {load['other_processes_cpu_share']:.0%} of all CPU time\n")
    print("| size | original -> drop-in | original ms | drop-in ms | speedup (medians) | speedup (paired) | reps |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in ratios(report):
        print(f"| {r['size']} | {r['pair']} | {r['original_ms']:.0f} | {r['drop_in_ms']:.0f} | "
              f"**{r['speedup']:.1f}x** | {r['speedup_paired']:.1f}x | {r['reps'][0]}, {r['reps'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
