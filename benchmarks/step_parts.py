"""Where the native steps spend their time: each pass of BertAdam and of LAMB against its
own byte floor at the in-place add's bandwidth, interleaved in one run.

    python benchmarks/step_parts.py --size bert-base --reps 15 --threads 2 --out FILE.json

BertAdam: norm pass, reads g (4 bytes/param); update pass, reads p, g, m, v, writes p, m, v
(28); the whole step (32) as `bertopt bench` times it. LAMB (every tensor adapted): pass 1
reads p, g, m, v and writes m, v (24); pass 2 reads p, m, v and writes p (16); the whole
step (norm + both passes: 44, or less where pass 2 finds its inputs in the cache).
Then the cost of a byte read and of a byte written, fitted to the single passes' times
(``read_write_fit``): what each pass and step costs at those prices, and LAMB / BertAdam.
"""

from __future__ import annotations

import statistics

import torch

from bertopt.bench import harness
from bertopt.bench.fit import READ_WRITE, read_write_fit
from bertopt.bench.methods import FAST_PATH, LAMB_FAST_PATH, METHODS
from bertopt.optim import _adam
from bertopt.optim.native import build, kernels


def main(argv=None) -> int:
    args = harness.script_arguments(__doc__, argv, reps=15)
    lib = build.library()
    if lib is None:
        raise SystemExit(build.status())
    t = harness.make_tensors(args.size)
    grads = [p.grad for p in t.params]
    data = [p.detach() for p in t.params]
    h = _adam.AdamHyper(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=False,
                        decoupled=True)
    lamb_scales = torch.full((len(data),), 1e-6)  # lr * trust ratio, small: the values stay tame
    steps = {
        "probe": harness.inplace_add_probe(t.count),
        "norm-pass": lambda: kernels.sum_of_squares(lib, grads),
        "update-pass": lambda: kernels.adam_step(lib, data, grads, *t.moments, None, h, 0.5),
        "step": METHODS[FAST_PATH].build(t.params, t.names, t.moments),
        "lamb-pass1": lambda: kernels.lamb_moments(lib, data, grads, *t.moments, None, h, 0.5, apply_scales=None),
        "lamb-pass2": lambda: kernels.lamb_apply(lib, data, *t.moments, None, h, lamb_scales),
        "lamb-step": METHODS[LAMB_FAST_PATH].build(t.params, t.names, t.moments),
    }
    times, load = harness.timed_under_load(steps, args.reps)
    probe = times["probe"]
    bytes_per_param = {name: r + w for name, (r, w) in READ_WRITE.items() if name != "probe"}
    summary = {"probe_GBps": 12 * t.count / statistics.median(probe) / 1e9}
    for name, b in bytes_per_param.items():
        summary[name] = {
            "median_ms": statistics.median(times[name]) * 1e3,
            "floor_ms": statistics.median(probe) * b / 12 * 1e3,
            "x_floor_paired": statistics.median(x / (p * b / 12) for x, p in zip(times[name], probe)),
        }
        print(f"{name:<12} {summary[name]['median_ms']:8.1f} ms, floor {summary[name]['floor_ms']:7.1f} ms, "
              f"x floor (paired) {summary[name]['x_floor_paired']:.3f}")
    print(f"in-place add {summary['probe_GBps']:.1f} GB/s; load: {load}")
    summary["read_write_fit"] = fit = read_write_fit(times, t.count)
    low, high = fit["write_over_read_unconstrained_90"]
    print(f"fit over the single passes: a read costs {fit['ns_per_read_byte']:.3f} ns/B, a write "
          f"{fit['ns_per_write_byte']:.3f} ns/B ({fit['write_over_read_unconstrained']:.2f} of a read, 90% "
          f"{low:.2f}..{high:.2f}{'; negative: taken as 0' if fit['write_cost_clamped_to_zero'] else ''}); "
          + ", ".join(f"{n} {x:.3f}" for n, x in fit["x_fitted"].items())
          + f"; LAMB/BertAdam at the fitted costs {fit['lamb_over_bertadam']:.3f} "
          f"(90% {fit['lamb_over_bertadam_90'][0]:.2f}..{fit['lamb_over_bertadam_90'][1]:.2f})")
    harness.write_script_report(args, __file__, argv, load=load, summary=summary, times_s=times)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
