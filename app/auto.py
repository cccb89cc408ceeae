"""DEFAULT_MODE=auto: at start-up, every served mode is timed under every sensible layout on this machine, and the
fastest that keeps its p99 within LATENCY_BUDGET_MS is served.

A layout is inference slots x intra-op threads per session: slots 1, 2, 4, ... up to the cores the process may
use, each with cores // slots threads (parallel mode divides them by the members again). Each candidate (mode,
layout) is timed in windows of AUTO_WINDOW_MS, a closed loop with as many callers as slots, the candidates
taking turns window by window (interleaved, so a slow spell of the machine hits them all), until every
candidate's last three windows agree within 5 % (perf_analyzer's stability rule) or AUTO_BUDGET_S runs out.
The choice: the highest throughput among the candidates whose p99 is within the budget; among those within 2 %
of it, the lowest p50. If none is within the budget, the lowest p99.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from app.runtime import EnsembleRuntime
from app.settings import Settings, available_cores
from ensemble_contract.modes import Mode

STABLE_WINDOWS = 3
STABLE_SPREAD = 0.05  # the last STABLE_WINDOWS throughputs within 5 % of their mean
EQUAL_THROUGHPUT = 0.02  # throughputs this close count as equal: the lower p50 wins
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # Student's t, 95 %


@dataclass(frozen=True, order=True)
class Layout:
    slots: int
    threads: int

    def __str__(self) -> str:
        return f"{self.slots}x{self.threads}"


def layouts(cores: int) -> list[Layout]:
    """Slots 1, 2, 4, ... and the cores themselves, each with cores // slots threads per session."""
    slots = sorted({*(2**i for i in range(cores.bit_length()) if 2**i <= cores), cores})
    return [Layout(s, cores // s) for s in slots]


class CandidateFigures(BaseModel):
    mode: Mode
    layout: str = Field(description="slots x intra-op threads")
    throughput_per_s: float = Field(description="Mean over the windows.")
    throughput_ci95: tuple[float, float]
    p50_ms: float
    p99_ms: float
    windows: int
    stable: bool
    within_budget: bool


class AutoChoice(BaseModel):
    mode: Mode
    layout: str
    slots: int
    threads: int
    reason: str
    latency_budget_ms: float
    measured_s: float
    candidates: list[CandidateFigures] = Field(description="Best first.")


@dataclass
class _Candidate:
    mode: Mode
    layout: Layout
    throughputs: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def stable(self) -> bool:
        last = self.throughputs[-STABLE_WINDOWS:]
        if len(last) < STABLE_WINDOWS:
            return False
        mean = statistics.fmean(last)
        return mean > 0 and all(abs(t - mean) <= STABLE_SPREAD * mean for t in last)

    def figures(self, latency_budget_s: float) -> CandidateFigures:
        mean = statistics.fmean(self.throughputs)
        n = len(self.throughputs)
        half = T_975.get(n - 1, 1.96) * statistics.stdev(self.throughputs) / n**0.5 if n > 1 else float("inf")
        p50, p99 = np.percentile(self.latencies, [50, 99]) if self.latencies else (float("inf"),) * 2
        return CandidateFigures(
            mode=self.mode,
            layout=str(self.layout),
            throughput_per_s=round(mean, 2),
            throughput_ci95=(round(mean - half, 2), round(mean + half, 2)),
            p50_ms=round(float(p50) * 1000, 3),
            p99_ms=round(float(p99) * 1000, 3),
            windows=n,
            stable=self.stable,
            within_budget=bool(p99 <= latency_budget_s),
        )


def _window(runtime: EnsembleRuntime, mode: Mode, callers: ThreadPoolExecutor, slots: int, seconds: float):
    """Throughput and latencies of `slots` callers in a closed loop for `seconds`."""
    feeds = runtime.manifest.example_inputs()
    deadline = time.perf_counter() + seconds
    lock, latencies = threading.Lock(), []

    def caller() -> None:
        mine = []
        while (start := time.perf_counter()) < deadline:
            runtime.infer(feeds, mode)
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    for future in [callers.submit(caller) for _ in range(slots)]:
        future.result()
    return len(latencies) / (time.perf_counter() - started), latencies


def rank(candidates: Sequence[CandidateFigures]) -> list[CandidateFigures]:
    """Best first: within the budget before over it; then by throughput (within EQUAL_THROUGHPUT: by p50); over
    the budget, by p99."""
    within = sorted((c for c in candidates if c.within_budget), key=lambda c: -c.throughput_per_s)
    if within:
        best = within[0].throughput_per_s
        equal = sorted(
            (c for c in within if c.throughput_per_s >= best * (1 - EQUAL_THROUGHPUT)), key=lambda c: c.p50_ms
        )
        rest = [c for c in within if c not in equal]
    else:
        equal, rest = [], []
    over = sorted((c for c in candidates if not c.within_budget), key=lambda c: c.p99_ms)
    return [*equal, *rest, *over]


def choose(
    settings: Settings, load: Callable[[Settings], EnsembleRuntime] = EnsembleRuntime.load
) -> tuple[EnsembleRuntime, AutoChoice]:
    """Loads a runtime per layout, times every candidate, keeps the chosen layout's runtime and closes the rest."""
    started = time.perf_counter()
    runtimes = {
        layout: load(settings.model_copy(update={"inference_slots": layout.slots}))
        for layout in layouts(available_cores())
    }
    budget_s, window_s = settings.auto_budget_s, settings.auto_window_ms / 1000
    latency_budget_s = settings.latency_budget_ms / 1000
    candidates = [_Candidate(mode, layout) for layout, runtime in runtimes.items() for mode in runtime.modes]
    pools = {layout: ThreadPoolExecutor(layout.slots, thread_name_prefix="auto") for layout in runtimes}
    try:
        deadline = started + budget_s
        while time.perf_counter() < deadline and not all(c.stable for c in candidates):
            for candidate in candidates:
                if time.perf_counter() >= deadline:
                    break
                throughput, latencies = _window(
                    runtimes[candidate.layout],
                    candidate.mode,
                    pools[candidate.layout],
                    candidate.layout.slots,
                    window_s,
                )
                candidate.throughputs.append(throughput)
                candidate.latencies.extend(latencies)
    finally:
        for pool in pools.values():
            pool.shutdown()
    ranked = rank([c.figures(latency_budget_s) for c in candidates if c.throughputs])
    best = ranked[0]
    layout = next(layout for layout in runtimes if str(layout) == best.layout)
    for other, runtime in runtimes.items():
        if other != layout:
            runtime.close()
    stable = sum(c.stable for c in candidates)
    reason = (
        f"highest throughput ({best.throughput_per_s:.1f}/s, p99 {best.p99_ms:.1f} ms within "
        f"{settings.latency_budget_ms:g} ms)"
        if best.within_budget
        else f"no candidate kept p99 within {settings.latency_budget_ms:g} ms: the lowest p99 ({best.p99_ms:.1f} ms)"
    ) + f"; {stable} of {len(candidates)} candidates stable"
    choice = AutoChoice(
        mode=best.mode,
        layout=best.layout,
        slots=layout.slots,
        threads=layout.threads,
        reason=reason,
        latency_budget_ms=settings.latency_budget_ms,
        measured_s=round(time.perf_counter() - started, 2),
        candidates=ranked,
    )
    return runtimes[layout], choice
