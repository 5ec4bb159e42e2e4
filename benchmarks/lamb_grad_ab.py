"""A/B of LAMB's pass 2: u recomputed from p, m, v (shipped: .grad is only read) against u
stored over the gradient in pass 1 and read back in pass 2 (the kernel before the one
.grad contract). Both run interleaved with BertAdam's step on the same tensors.

    python benchmarks/lamb_grad_ab.py --size bert-base --reps 15 --threads 2 --out FILE.json

The variant is lamb.c compiled with -DLAMB_U_OVER_G (``build.variant_library``) into a
temporary directory; its float32 results are the same (tests/optim/test_lamb.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

from bertopt.bench import harness
from bertopt.bench.methods import FAST_PATH, LAMB_FAST_PATH, METHODS
from bertopt.optim.native import build


def main(argv=None) -> int:
    args = harness.script_arguments(__doc__, argv, reps=15)
    if build.library() is None:
        raise SystemExit(build.status())
    with tempfile.TemporaryDirectory() as tmp:
        variant = build.variant_library(Path(tmp), {"LAMB_U_OVER_G": 1})
        tensors = harness.make_tensors(args.size)
        shipped_step = METHODS[LAMB_FAST_PATH].build(tensors.params, tensors.names, tensors.moments)
        variant_opt_step = METHODS[LAMB_FAST_PATH].build(tensors.params, tensors.names, tensors.moments)

        def variant_step():
            with mock.patch.object(build, "library", lambda: variant):
                variant_opt_step()

        steps = {"bertadam": METHODS[FAST_PATH].build(tensors.params, tensors.names, tensors.moments),
                 "lamb-recompute-u": shipped_step, "lamb-u-over-g": variant_step}
        times, load = harness.timed_under_load(steps, args.reps)
    summary = harness.paired_to(times, "bertadam", "vs_bertadam_paired")
    for name, s in summary.items():
        print(f"{name:<18} {s['median_ms']:8.1f} ms   x BertAdam (paired) {s['vs_bertadam_paired']:.3f}")
    print(f"load: {load}")
    harness.write_script_report(args, __file__, argv, load=load, summary=summary, times_s=times)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
