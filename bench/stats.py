"""Latency summaries (median and tail percentiles of a list of durations), and the mean of a few per-round
figures with its 95 % confidence interval."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel
from scipy import stats


class Summary(BaseModel):
    """Durations in milliseconds."""

    count: int
    median_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        if not seconds:
            raise ValueError("no samples to summarise")
        ms = np.asarray(seconds, dtype=np.float64) * 1000
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(
            count=len(ms),
            median_ms=float(p50),
            p95_ms=float(p95),
            p99_ms=float(p99),
            mean_ms=float(ms.mean()),
            min_ms=float(ms.min()),
        )

    def brief(self) -> str:
        return f"p50 {self.median_ms:.2f} ms, p95 {self.p95_ms:.2f} ms (n={self.count})"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


@dataclass(frozen=True)
class Interval:
    """A mean over rounds with its 95 % t-interval (unbounded with one round)."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        mean = statistics.fmean(values)
        if len(values) < 2:
            return cls(mean, float("-inf"), float("inf"))
        half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
        return cls(mean, mean - half, mean + half)

    def __str__(self) -> str:
        return f"{self.mean:.2f} [95% CI {self.low:.2f}-{self.high:.2f}]"
