"""The one timing loop every offline measurement uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How long each configuration is timed: warm-up calls, then timed calls up to a count or a duration."""

    warmup: int
    runs: int
    max_seconds: float


def time_calls(
    calls: Sequence[Callable[[], object]], *, warmup: int, runs: int, max_seconds: float
) -> list[list[float]]:
    """Calls `calls` in turn (a rotation), `warmup` rounds untimed, then up to `runs` timed rounds.

    Stops early once `max_seconds` of timed rounds have passed (after at least one round). Returns the
    durations in seconds per call: result[i] holds call i's samples, in order.
    """
    if not calls:
        raise ValueError("nothing to time")
    for _ in range(warmup):
        for call in calls:
            call()
    samples: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + max_seconds
    for _ in range(runs):
        for call, durations in zip(calls, samples, strict=True):
            start = time.perf_counter()
            call()
            durations.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return samples
