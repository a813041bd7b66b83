"""Summaries of repeated measurements: the raw samples are kept beside median, p90, p99, mean and stdev."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, the 'type 7' estimator)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    unit: str
    n: int
    median: float
    mean: float
    p90: float
    p99: float
    stdev: float  # sample standard deviation (n - 1); 0 for a single sample
    min: float
    max: float

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float], unit: str) -> Summary:
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        nan = math.nan
        return Summary(unit, 0, nan, nan, nan, nan, nan, nan, nan)
    mean = sum(vals) / n
    stdev = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return Summary(unit, n, percentile(vals, 50), mean, percentile(vals, 90), percentile(vals, 99), stdev,
                   min(vals), max(vals))
