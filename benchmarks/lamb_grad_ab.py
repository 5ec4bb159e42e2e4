"""A/B of LAMB's pass 2: u recomputed from p, m, v (shipped: .grad is only read) against u
stored over the gradient in pass 1 and read back in pass 2 (the kernel before the one
.grad contract). Both run interleaved with BertAdam's step on the same tensors.

    python benchmarks/lamb_grad_ab.py --size bert-base --reps 15 --threads 2 --out FILE.json

The variant is compiled from csrc/ with four textual substitutions (below), into a
temporary directory; its float32 results are the same.
"""

from __future__ import annotations

import ctypes
import statistics
import tempfile
from pathlib import Path
from unittest import mock

from bertopt.bench import harness
from bertopt.bench.methods import FAST_PATH, LAMB_FAST_PATH, METHODS
from bertopt.optim.native import build, kernels

U_OVER_G = [
    ("static inline void lamb_moments_span(float *restrict p, const float *restrict g,",
     "static inline void lamb_moments_span(float *restrict p, float *restrict g,"),
    ("        if (apply) p[i] = pi - u * apply_scale;                                            \\",
     "        if (apply) p[i] = pi - u * apply_scale; else g[i] = u;                             \\"),
    ("    const float *g = a->g[t] + s;\n    const int apply = a->scale != NULL;",
     "    float *g = a->g[t] + s;\n    const int apply = a->scale != NULL;"),
    ("        p[i] = pi - lamb_update(m[i], v[i], pi, bc1, bc2, eps, wd, bias_corr, has_wd) * sc;",
     "        p[i] = pi - m[i] * sc;  /* m is u here */"),
    ("    const float *m = a->m[t] + s, *v = a->v[t] + s;\n    const int bc = a->bc1 != NULL, wd",
     "    const float *m = a->g[t] + s, *v = a->v[t] + s;\n    const int bc = a->bc1 != NULL, wd"),
]


def variant_library(tmp: Path) -> ctypes.CDLL:
    csrc = tmp / "csrc"
    csrc.mkdir()
    for name in (*build.HEADERS, *build.SOURCES):
        text = (build.CSRC / name).read_text()
        if name == "lamb.c":
            for old, new in U_OVER_G:
                assert old in text, old
                text = text.replace(old, new)
        (csrc / name).write_text(text)
    out = tmp / "variant.so"
    with mock.patch.object(build, "CSRC", csrc):
        err = build.compile_library(build.find_compiler(), out, build.BASE_FLAGS + ["-march=native"])
    if err:
        raise SystemExit(err)
    lib = ctypes.CDLL(str(out))
    kernels.declare(lib)
    return lib


def main(argv=None) -> int:
    args = harness.script_arguments(__doc__, argv, reps=15)
    if build.library() is None:
        raise SystemExit(build.status())
    with tempfile.TemporaryDirectory() as tmp:
        variant = variant_library(Path(tmp))
        tensors = harness.make_tensors(args.size)
        shipped_step = METHODS[LAMB_FAST_PATH].build(tensors.params, tensors.names, tensors.moments)
        variant_opt_step = METHODS[LAMB_FAST_PATH].build(tensors.params, tensors.names, tensors.moments)

        def variant_step():
            with mock.patch.object(build, "library", lambda: variant):
                variant_opt_step()

        steps = {"bertadam": METHODS[FAST_PATH].build(tensors.params, tensors.names, tensors.moments),
                 "lamb-recompute-u": shipped_step, "lamb-u-over-g": variant_step}
        for step in steps.values():
            step()
        monitor = harness.LoadMonitor()
        times = harness.interleaved_times(steps, {name: args.reps for name in steps})
        load = monitor.stop()
    adam = times["bertadam"]
    summary = {name: {"median_ms": statistics.median(t) * 1e3,
                      "vs_bertadam_paired": statistics.median(a / b for a, b in zip(t, adam))}
               for name, t in times.items()}
    for name, s in summary.items():
        print(f"{name:<18} {s['median_ms']:8.1f} ms   x BertAdam (paired) {s['vs_bertadam_paired']:.3f}")
    print(f"load: {load}")
    harness.write_script_report(args, __file__, argv, load=load, summary=summary, times_s=times)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
