"""Recent latencies per mode, kept in memory for GET /stats (a quick live view; Prometheus keeps the history)."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from app.engine.timing import percentiles_ms
from ensemble_contract.modes import Mode

MAX_SAMPLES_PER_MODE = 10_000  # bounds memory whatever the request rate


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() when the request finished
    request_s: float
    queue_s: float
    inference_s: float
    cpu_s: float
    batch_rows: int


@dataclass(frozen=True)
class Percentiles:
    p50_ms: float | None
    p95_ms: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Percentiles:
        if not seconds:
            return cls(None, None)
        p50, p95 = percentiles_ms(seconds, [50, 95])
        return cls(round(p50, 3), round(p95, 3))


@dataclass(frozen=True)
class ModeSummary:
    requests: int
    request: Percentiles
    queue: Percentiles
    inference: Percentiles
    cpu_seconds: float  # of every request in the window
    mean_batch_rows: float | None  # of the inferences the requests ran in

    @property
    def predictions_per_cpu_second(self) -> float | None:
        return round(self.requests / self.cpu_seconds, 3) if self.cpu_seconds > 0 else None


class RecentLatencies:
    """The last `window_s` seconds of successful predictions of each of `modes` (at most MAX_SAMPLES_PER_MODE each)."""

    def __init__(self, window_s: float, modes: Sequence[Mode]) -> None:
        self.window_s = window_s
        self._samples = {mode: deque[Sample](maxlen=MAX_SAMPLES_PER_MODE) for mode in modes}

    def record(
        self, mode: Mode, *, request_s: float, queue_s: float, inference_s: float, cpu_s: float, batch_rows: int
    ) -> None:
        self._samples[mode].append(Sample(time.monotonic(), request_s, queue_s, inference_s, cpu_s, batch_rows))

    def summary(self) -> dict[Mode, ModeSummary]:
        since = time.monotonic() - self.window_s
        result = {}
        for mode, samples in self._samples.items():
            while samples and samples[0].at < since:
                samples.popleft()
            recent = list(samples)
            result[mode] = ModeSummary(
                len(recent),
                Percentiles.of([s.request_s for s in recent]),
                Percentiles.of([s.queue_s for s in recent]),
                Percentiles.of([s.inference_s for s in recent]),
                sum(s.cpu_s for s in recent),
                round(statistics.fmean(s.batch_rows for s in recent), 2) if recent else None,
            )
        return result
