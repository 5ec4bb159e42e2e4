"""Summaries over seeds: mean +/- std, and paired differences against the baseline.

Runs of different variants with the same seed share the model initialisation and the data
order, so the difference per seed removes most of the seed-to-seed spread; we report its mean,
its standard deviation and a 95% t-interval, and call a difference distinguishable only when
that interval excludes 0.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95% quantiles of Student's t for n-1 degrees of freedom (n = number of seeds)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 24: 2.064, 29: 2.045, 39: 2.023}


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (n-1); 0 for a single value

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}"


@dataclass(frozen=True)
class PairedDifference:
    n: int
    mean: float  # mean over seeds of (variant - baseline)
    std: float
    ci_low: float
    ci_high: float

    @property
    def distinguishable(self) -> bool:
        return self.n >= 2 and (self.ci_low > 0 or self.ci_high < 0)

    def __str__(self) -> str:
        return f"{self.mean:+.4f} ± {self.std:.4f} [{self.ci_low:+.4f}, {self.ci_high:+.4f}]"


def _t95(df: int) -> float:
    """Student's t quantile from the table; between entries, the next smaller df's (a wider interval)."""
    return _T95[max(k for k in _T95 if k <= df)] if df <= 39 else 1.96 + 2.4 / df


def summarize(values: list[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarize")
    if not all(math.isfinite(v) for v in values):
        return Summary(len(values), math.nan, math.nan)  # a diverged run: shown as nan, not averaged away
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(len(values), statistics.fmean(values), std)


def paired_difference(variant: dict[int, float], baseline: dict[int, float]) -> PairedDifference:
    """Differences over the seeds both have (keys are seeds)."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        raise ValueError("no seed in common between variant and baseline")
    diffs = [variant[s] - baseline[s] for s in seeds]
    s = summarize(diffs)
    half = _t95(s.n - 1) * s.std / math.sqrt(s.n) if s.n > 1 else math.inf
    return PairedDifference(s.n, s.mean, s.std, s.mean - half, s.mean + half)
