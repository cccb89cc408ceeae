"""DEFAULT_MODE=auto: at start-up, every served mode is timed under every sensible layout on this machine, and the
fastest that keeps its p99 within LATENCY_BUDGET_MS is served.

A layout is inference slots x intra-op threads per session: slots 1, 2, 4, ... up to the cores the process may
use, each with cores // slots threads (parallel mode divides them by the members again). The layouts are loaded
one at a time (a layout of many multi-threaded slots holds a session set per slot: loading them all at once
would multiply the memory), and each layout's modes (the candidates) are timed in windows of AUTO_WINDOW_MS, a
closed loop with as many callers as slots, taking turns window by window (interleaved, so a slow spell of the
machine hits them all), until every candidate's last three windows agree within 5 % (perf_analyzer's
stability rule) or the layout's share of AUTO_BUDGET_S (which counts the timing, not the loading) runs out;
every candidate gets one window at least. The latencies are an inference's in that closed loop, queueing for
a slot not included. The choice: the highest throughput among the candidates whose p99 is within
LATENCY_BUDGET_MS; among those within 2 % of it, the lowest p50. If none is within the budget, the lowest p99.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from app.engine.resources import available_cores
from app.engine.runtime import EnsembleRuntime
from app.engine.timing import mean_interval, percentiles_ms
from app.errors import StartupError
from app.settings import Settings
from ensemble_contract.modes import Mode

STABLE_WINDOWS = 3
STABLE_SPREAD = 0.05  # the last STABLE_WINDOWS throughputs within 5 % of their mean
EQUAL_THROUGHPUT = 0.02  # throughputs this close count as equal: the lower p50 wins
@dataclass(frozen=True, order=True)
class SlotLayout:
    slots: int
    threads: int

    def __str__(self) -> str:
        return f"{self.slots}x{self.threads}"


def layouts(cores: int) -> list[SlotLayout]:
    """Slots 1, 2, 4, ... and the cores themselves, each with cores // slots threads per session."""
    slots = sorted({*(2**i for i in range(cores.bit_length())), cores})
    return [SlotLayout(s, cores // s) for s in slots]


class CandidateFigures(BaseModel):
    mode: Mode
    layout: str = Field(description="slots x intra-op threads")
    throughput_per_s: float = Field(description="Mean over the windows.")
    throughput_ci95: tuple[float | None, float | None] = Field(description="None with a single window.")
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
    layout: SlotLayout
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
        mean, low, high = mean_interval(self.throughputs)
        n = len(self.throughputs)
        interval = (round(low, 2), round(high, 2)) if n > 1 else (None, None)
        p50_ms, p99_ms = percentiles_ms(self.latencies, [50, 99])
        return CandidateFigures(
            mode=self.mode,
            layout=str(self.layout),
            throughput_per_s=round(mean, 2),
            throughput_ci95=interval,
            p50_ms=round(p50_ms, 3),
            p99_ms=round(p99_ms, 3),
            windows=n,
            stable=self.stable,
            within_budget=p99_ms <= latency_budget_s * 1000,
        )


def _window(
    runtime: EnsembleRuntime, mode: Mode, feeds: Mapping[str, np.ndarray], callers: ThreadPoolExecutor, seconds: float
) -> tuple[float, list[float]]:
    """Throughput and latencies of as many callers as the runtime has slots, in a closed loop for `seconds`."""
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
    for future in [callers.submit(caller) for _ in range(runtime.slots)]:
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


def _time_layout(runtime: EnsembleRuntime, layout: SlotLayout, budget_s: float, window_s: float) -> list[_Candidate]:
    """Every mode of one layout, in turns of one window each, until all are stable or the budget is spent (one
    window each at least)."""
    candidates = [_Candidate(mode, layout) for mode in runtime.modes]
    feeds = runtime.manifest.example_inputs()
    deadline = time.perf_counter() + budget_s
    with ThreadPoolExecutor(layout.slots, thread_name_prefix="auto") as callers:
        while not candidates[-1].throughputs or (
            time.perf_counter() < deadline and not all(c.stable for c in candidates)
        ):
            for candidate in candidates:
                throughput, latencies = _window(runtime, candidate.mode, feeds, callers, window_s)
                candidate.throughputs.append(throughput)
                candidate.latencies.extend(latencies)
    return candidates


def choose(
    settings: Settings, candidate_layouts: Sequence[SlotLayout] | None = None
) -> tuple[EnsembleRuntime, AutoChoice]:
    """Times every mode under every layout (or those given), one layout loaded at a time, and returns the runtime
    of the chosen layout (the only one left open) with the measurement."""
    started = time.perf_counter()
    latency_budget_s = settings.latency_budget_ms / 1000
    every_layout = list(candidate_layouts or layouts(available_cores()))
    share_s, window_s = settings.auto_budget_s / len(every_layout), settings.auto_window_ms / 1000
    figures: list[CandidateFigures] = []
    kept: tuple[SlotLayout, EnsembleRuntime] | None = None
    for layout in every_layout:
        runtime = EnsembleRuntime.load(settings.model_copy(update={"inference_slots": layout.slots}))
        figures += [c.figures(latency_budget_s) for c in _time_layout(runtime, layout, share_s, window_s)]
        best_layout = rank(figures)[0].layout
        if best_layout == str(layout):
            if kept is not None:
                kept[1].close()
            kept = (layout, runtime)
        else:
            runtime.close()
    if kept is None:
        raise StartupError("DEFAULT_MODE=auto: no layout could be timed")
    ranked = rank(figures)
    best, (layout, runtime) = ranked[0], kept
    timed = len(ranked)
    stable = sum(c.stable for c in ranked)
    reason = (
        f"highest throughput ({best.throughput_per_s:.1f}/s, p99 {best.p99_ms:.1f} ms within "
        f"{settings.latency_budget_ms:g} ms)"
        if best.within_budget
        else f"no candidate kept p99 within {settings.latency_budget_ms:g} ms: the lowest p99 ({best.p99_ms:.1f} ms)"
    ) + f"; {stable} of {timed} candidates stable"
    choice = AutoChoice(
        mode=best.mode,
        layout=best.layout,
        slots=layout.slots,
        threads=runtime.plans[best.mode].intra_op_threads,
        reason=reason,
        latency_budget_ms=settings.latency_budget_ms,
        measured_s=round(time.perf_counter() - started, 2),
        candidates=ranked,
    )
    return runtime, choice
