"""The issue's targets: a measured ratio against its limit, printed and written as a table row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.markdown import table
from bench.stats import Interval


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    at_most: bool = True  # the target is value <= limit (else value >= limit)
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "not measured"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "met" if ok else "MISSED"

    def row(self) -> list[str]:
        sign = "≤" if self.at_most else "≥"
        return [self.name, f"{self.value:.2f}{self.unit}", f"{sign} {self.limit:g}{self.unit}", self.verdict]


def checks_table(checks: Sequence[Check]) -> str:
    return table(["target", "measured", "limit", "verdict"], [c.row() for c in checks])


def interval_check(
    name: str, interval: Interval, *, at_least: float | None = None, at_most: float | None = None
) -> str:
    """One line: a target met only when the whole interval is on its side."""
    met = (at_least is None or interval.low >= at_least) and (at_most is None or interval.high <= at_most)
    bound = f">= {at_least:g}" if at_least is not None else f"<= {at_most:g}"
    return f"{'MET   ' if met else 'MISSED'} {name}: {interval} (target {bound})"
