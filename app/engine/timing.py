"""The figures every measurement of the project reports, computed one way: one request's timing record, percentiles
of durations, and a mean with its 95 % t-interval (auto's windows, /stats, the benchmarks, deploy/loadgen.py)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Student's t at 97.5 % by degrees of freedom (the service has no scipy); past 30, the normal's 1.96.
T_975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
         2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04)  # fmt: skip


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, under one name per fact from the runtime to the response, /stats and the
    metrics: the runtime measures its run, the scheduler its wait and its batch, the data plane the rest."""

    inference_s: float  # ONNX Runtime time of the run it was part of
    cpu_s: float  # its share, by rows, of the CPU seconds of every thread (its run's; its decoding and mask too)
    queue_s: float = 0.0  # from joining the scheduler's queue until its run started: waiting for a slot and its batch
    batch_wait_s: float = 0.0  # the part of queue_s spent gathering the batch once a slot was free
    batch_rows: int = 1  # rows of the run it was part of, its own included
    request_s: float = 0.0  # from the request's arrival to its result


def percentiles_ms(seconds: Sequence[float], percents: Sequence[float]) -> list[float]:
    """The given percentiles (0 to 100, linearly interpolated) of durations in seconds, in milliseconds."""
    return [float(p) for p in np.percentile(np.asarray(seconds, dtype=np.float64) * 1000, percents)]


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """The mean and its 95 % t-interval (low, high); unbounded with a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("-inf"), float("inf")
    n = len(values)
    half = (T_975[n - 2] if n - 2 < len(T_975) else 1.96) * statistics.stdev(values) / n**0.5
    return mean, mean - half, mean + half
