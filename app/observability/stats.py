"""Recent latencies per mode, kept for GET /stats (a quick live view; Prometheus keeps the history).

Each mode's samples are a ring of the last MAX_SAMPLES_PER_MODE, in memory or, with worker processes, in a file of
the workers' directory (app.workers) that whichever worker answers /stats reads together with its own: the
percentiles are those of every worker's requests, not an average of the workers' percentiles. Times are
time.monotonic(), one clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.engine.timing import Timing, percentiles_ms
from app.workers import WorkerGroup
from ensemble_contract.modes import Mode

MAX_SAMPLES_PER_MODE = 10_000  # a worker's: bounds memory whatever the request rate
# `at`: when the request finished; the others: its Timing's.
FIELDS = ("at", "request_s", "queue_s", "inference_s", "cpu_s", "batch_rows")
AT, REQUEST, QUEUE, INFERENCE, CPU, BATCH_ROWS = range(len(FIELDS))


class SampleRing:
    """One worker's last MAX_SAMPLES_PER_MODE samples of one mode: rows of FIELDS, `at` NaN where none was written."""

    def __init__(self, path: Path | None) -> None:
        shape = (MAX_SAMPLES_PER_MODE, len(FIELDS))
        if path is None:
            self.rows = np.full(shape, np.nan)
        else:
            # A reload's new ring reuses the file in place: truncating it ("w+") while the replaced model's ring still
            # maps it would kill the process with SIGBUS at that ring's next write.
            reuse = path.exists() and path.stat().st_size == np.dtype(np.float64).itemsize * shape[0] * shape[1]
            self.rows = np.memmap(path, np.float64, "r+" if reuse else "w+", shape=shape)
        self.rows[:, AT] = np.nan
        self._next = 0

    def append(self, sample: tuple[float, ...]) -> None:
        self.rows[self._next] = sample
        self._next = (self._next + 1) % MAX_SAMPLES_PER_MODE

    @staticmethod
    def read(path: Path) -> np.ndarray:
        """Another worker's ring as it is now (no rows if it has none yet)."""
        try:
            return np.fromfile(path, np.float64).reshape(-1, len(FIELDS))
        except (OSError, ValueError):
            return np.empty((0, len(FIELDS)))


@dataclass(frozen=True)
class Percentiles:
    p50_ms: float | None
    p95_ms: float | None

    @classmethod
    def of(cls, seconds: np.ndarray) -> Percentiles:
        if not len(seconds):
            return cls(None, None)
        p50, p95 = percentiles_ms(list(seconds), [50, 95])
        return cls(round(p50, 3), round(p95, 3))


@dataclass(frozen=True)
class ModeSummary:
    requests: int
    request_ms: Percentiles
    queue_ms: Percentiles
    inference_ms: Percentiles
    cpu_s: float  # of every request in the window
    mean_batch_rows: float | None  # of the inferences the requests ran in

    @property
    def predictions_per_cpu_second(self) -> float | None:
        return round(self.requests / self.cpu_s, 3) if self.cpu_s > 0 else None


class RecentLatencies:
    """The last `window_s` seconds of successful predictions of each of `modes`, of every worker."""

    def __init__(self, window_s: float, modes: Sequence[Mode], workers: WorkerGroup | None = None) -> None:
        self.window_s = window_s
        self.workers = workers or WorkerGroup()
        self._rings = {mode: SampleRing(self.workers.recent_file(mode)) for mode in modes}
        self._reading: asyncio.Future[dict[Mode, ModeSummary]] | None = None

    def record(self, mode: Mode, timing: Timing) -> None:
        self._rings[mode].append(
            (time.monotonic(), timing.request_s, timing.queue_s, timing.inference_s, timing.cpu_s, timing.batch_rows)
        )

    async def shared_summary(self) -> dict[Mode, ModeSummary]:
        """summary(), read in a thread, and shared by the callers that ask while it is read: however often /stats
        is asked, one read of every worker's samples runs at a time, and never on the event loop."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(asyncio.to_thread(self.summary))
        return await asyncio.shield(self._reading)

    def summary(self) -> dict[Mode, ModeSummary]:
        since = time.monotonic() - self.window_s
        result = {}
        siblings = self.workers.sibling_recent_files(self._rings)  # the workers' statuses read once, not per mode
        for mode, ring in self._rings.items():
            every = [ring.rows, *(SampleRing.read(path) for path in siblings[mode])]
            rows = np.concatenate(every)
            recent = rows[rows[:, AT] >= since]  # NaN, a row never written, compares false
            result[mode] = ModeSummary(
                len(recent),
                Percentiles.of(recent[:, REQUEST]),
                Percentiles.of(recent[:, QUEUE]),
                Percentiles.of(recent[:, INFERENCE]),
                float(recent[:, CPU].sum()),
                round(float(recent[:, BATCH_ROWS].mean()), 2) if len(recent) else None,
            )
        return result
