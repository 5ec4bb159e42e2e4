"""How many streams should the norm pass read at once? (issue 13)

The native norm pass (csrc/norm.c) sums squares a block at a time from NORM_STREAMS places
in a span at once, so that one core keeps enough cache lines in flight. This script builds
the kernel library with NORM_STREAMS = 1, 2, 4 and 8 (same blocks, same accuracy) and times
their sum of squares over bert-base's gradients, interleaved round by round with the
in-place add probe, and reports medians and the median per-round ratio to one stream.

    python benchmarks/norm_streams.py --threads 2 --reps 21 --out benchmarks/results/norm_streams.json
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bertopt.bench import harness
from bertopt.optim.native import build, kernels

STREAMS = (1, 2, 4, 8)


def main(argv=None) -> int:
    args = harness.script_arguments(__doc__, argv, reps=21)
    t = harness.make_tensors(args.size)
    grads = [p.grad for p in t.params]
    steps = {"probe": harness.inplace_add_probe(t.count)}
    with tempfile.TemporaryDirectory() as tmp:
        for k in STREAMS:
            lib = build.variant_library(Path(tmp), {"NORM_STREAMS": k})
            steps[f"streams-{k}"] = lambda lib=lib: kernels.sum_of_squares(lib, grads)
        sums = {name: step() for name, step in steps.items() if name != "probe"}
        if max(sums.values()) / min(sums.values()) - 1 > 1e-7:  # same blocks, only their order differs
            raise SystemExit(f"the variants disagree: {sums}")
        times, load = harness.timed_under_load(steps, args.reps, warmup=0)  # the sums warmed the kernels up
    probe = statistics.median(times["probe"])
    summary = {"probe_GBps": 12 * t.count / probe / 1e9, "norm_floor_ms": probe * 4 / 12 * 1e3,
               **harness.paired_to(times, "streams-1", "vs_one_stream_paired")}
    for name in times:
        print(f"{name:<11} {summary[name]['median_ms']:7.1f} ms   x one stream (paired) "
              f"{summary[name]['vs_one_stream_paired']:.3f}")
    print(f"norm floor (4 B/param at the in-place add's {summary['probe_GBps']:.1f} GB/s): "
          f"{summary['norm_floor_ms']:.1f} ms; load: {load}")
    harness.write_script_report(args, __file__, argv, load=load, summary=summary, times_s=times)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
