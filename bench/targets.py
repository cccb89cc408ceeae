"""The issue's targets: a measured ratio against its limit, printed and written as a table row."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.markdown import table


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
