"""What a byte read and a byte written cost, fitted to the times of single kernel passes.

``benchmarks/step_parts.py`` times each pass of BertAdam's and LAMB's native steps, and the
in-place add probe, interleaved; ``read_write_fit`` splits their medians into a price per byte
read and per byte written (least squares), so a step's bytes can be priced at those rates.
"""

from __future__ import annotations

import statistics

import numpy as np

# Bytes per parameter each timed kernel reads and writes.
READ_WRITE = {"probe": (8, 4), "norm-pass": (4, 0), "update-pass": (16, 12), "lamb-pass1": (16, 8),
              "lamb-pass2": (12, 4), "step": (20, 12), "lamb-step": (32, 12)}
SINGLE_PASSES = ("probe", "norm-pass", "update-pass", "lamb-pass1", "lamb-pass2")


def _least_squares(medians: dict[str, float], count: int) -> tuple[float, float, float]:
    """(read, write, unconstrained write) seconds per byte fitted to the single passes; a write
    cost that comes out negative is set to 0 and the reads alone refitted (no cost is negative)."""
    rows = np.array([READ_WRITE[n] for n in SINGLE_PASSES], dtype=float) * count
    seconds = np.array([medians[n] for n in SINGLE_PASSES])
    (read, write), *_ = np.linalg.lstsq(rows, seconds, rcond=None)
    if write >= 0:
        return float(read), float(write), float(write)
    return float(rows[:, 0] @ seconds / (rows[:, 0] @ rows[:, 0])), 0.0, float(write)


def read_write_fit(times: dict[str, list[float]], count: int, resamples: int = 2000) -> dict:
    """Costs of a byte read and a byte written, fitted to the single passes' median times, with
    90% intervals from resampling the rounds (each round timed every kernel once).

    The floors above charge every byte at the in-place add's rate; on a machine where writes are
    cheaper than reads (writes drain in the background; a core's reads wait) that overstates a
    write-heavy pass's floor and understates a read-heavy one's. The fit says how the passes'
    times split, and so what LAMB (32 bytes read, 12 written) costs against BertAdam (20, 12)."""
    def fitted(read, write, name):
        r, w = READ_WRITE[name]
        return (r * read + w * write) * count

    def ratios(medians):
        read, write, unconstrained = _least_squares(medians, count)
        return unconstrained / read, fitted(read, write, "lamb-step") / fitted(read, write, "step")

    medians = {n: statistics.median(times[n]) for n in READ_WRITE}
    read, write, unconstrained = _least_squares(medians, count)
    rounds = min(len(times[n]) for n in READ_WRITE)
    columns = {n: np.asarray(times[n][:rounds]) for n in READ_WRITE}
    rng = np.random.default_rng(0)
    draws = np.array([ratios({n: float(np.median(c[picked])) for n, c in columns.items()})
                      for picked in (rng.integers(0, rounds, rounds) for _ in range(resamples))])
    interval = np.percentile(draws, [5, 95], axis=0)
    return {"ns_per_read_byte": read * 1e9, "ns_per_write_byte": write * 1e9, "write_over_read": write / read,
            "write_over_read_unconstrained": unconstrained / read, "write_cost_clamped_to_zero": unconstrained < 0,
            "write_over_read_unconstrained_90": interval[:, 0].tolist(),
            "x_fitted": {n: medians[n] / fitted(read, write, n) for n in READ_WRITE},
            "lamb_over_bertadam": fitted(read, write, "lamb-step") / fitted(read, write, "step"),
            "lamb_over_bertadam_90": interval[:, 1].tolist()}
