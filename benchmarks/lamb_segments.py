"""Does running LAMB's two passes a cache-sized segment at a time pay? (issue 4)

LAMB's C kernel needs two passes over each adapted tensor: pass 1 (moments, sums of p^2
and u^2), then pass 2 (u again from p, m, v; p -= lr * r * u). Run over the whole model,
pass 2 rereads p, m, v from memory. Run a segment of ~1M elements at a time, with each thread
redoing pass 2 on the parts it did in pass 1, most of them are still in its caches.

This script times, interleaved round by round on the same BERT-shaped tensors:

    segmented   Lamb(fused=True) as shipped (``kernels.SEGMENT_NUMEL`` elements per segment)
    segment-256K, segment-4M  the same with segments of 256K and 4M elements
    one-segment the same one-call kernel with a single segment per bucket
    two-calls   pass 1 on everything, then pass 2 on everything (the sharded path's calls)
    bertadam    BertAdam(fused=True), the yardstick of the LAMB target

and reports medians and the median per-round ratio to BertAdam.

    python benchmarks/lamb_segments.py --size bert-base --reps 25 --threads 2 --out benchmarks/results/lamb_segments.json
"""

from __future__ import annotations

import torch

from bertopt.bench import harness
from bertopt.bench.methods import FAST_PATH, LAMB_FAST_PATH, METHODS
from bertopt.optim import _lamb
from bertopt.optim.native import build, kernels


def two_calls(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef, trust_clip,
              segment_numel=None):
    """The step as two kernel calls over all tensors: what the segmented step replaces."""
    p_sq, u_sq = kernels.lamb_moments(lib, params, grads, exp_avgs, exp_avg_sqs, bias_corrections, h, clip_coef,
                                      apply_scales=None)
    norms = torch.cat([p_sq, u_sq]).sqrt().float()
    n = len(params)
    kernels.lamb_apply(lib, params, exp_avgs, exp_avg_sqs, bias_corrections, h, _lamb.trust_ratio(norms[:n], norms[n:], trust_clip) * h.lr)


def main(argv=None) -> int:
    args = harness.script_arguments(__doc__, argv, reps=25)
    if build.library() is None:
        raise SystemExit(f"the LAMB kernel is unavailable: {build.status()}")

    shipped = kernels.lamb_step
    variants = {
        "segmented": shipped,
        "segment-256K": lambda *a, **k: shipped(*a, segment_numel=1 << 18),
        "segment-4M": lambda *a, **k: shipped(*a, segment_numel=1 << 22),
        "one-segment": lambda *a, **k: shipped(*a, segment_numel=1 << 62),
        "two-calls": two_calls,
    }
    tensors = harness.make_tensors(args.size)
    steps = {}
    for name, variant in variants.items():
        lamb_step = METHODS[LAMB_FAST_PATH].build(tensors.params, tensors.names, tensors.moments)

        def run(lamb_step=lamb_step, variant=variant):
            kernels.lamb_step = variant
            try:
                lamb_step()
            finally:
                kernels.lamb_step = shipped

        steps[name] = run
    steps["bertadam"] = METHODS[FAST_PATH].build(tensors.params, tensors.names, tensors.moments)
    times, load = harness.timed_under_load(steps, args.reps)
    summary = harness.paired_to(times, "bertadam", "vs_bertadam_paired")
    for name, s in summary.items():
        print(f"{name:<12} {s['median_ms']:8.1f} ms   x BertAdam (paired) {s['vs_bertadam_paired']:.3f}")
    print(f"load: {load}")
    harness.write_script_report(args, __file__, argv, segment_numel=kernels.SEGMENT_NUMEL, load=load,
                                summary=summary, times_s=times)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
