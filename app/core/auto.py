"""DEFAULT_MODE=auto: at start-up, every served mode is timed under every sensible layout and batching on this
machine, and the fastest that keeps its p99 within LATENCY_BUDGET_MS is served.

A layout is inference slots x intra-op threads per session: slots 1, 2, 4, ... up to the cores the process may
use, each with cores // slots threads (parallel mode divides them by the members again). Batching is off, or on
with a few sizes up to BATCHING_MAX_ROWS (for a model whose batch dimension is not fixed). The layouts are loaded
one at a time (a layout of many multi-threaded slots holds a session set per slot: loading them all at once
would multiply the memory), and each layout's candidates (mode x batching) are timed through the service's own
scheduler and batching, in windows of AUTO_WINDOW_MS: a closed loop of one-row requests from as many callers as
slots x batch rows (enough to fill the batches), taking turns window by window (interleaved, so a slow spell of
the machine hits them all), until every candidate's last three windows agree within 5 % (perf_analyzer's
stability rule) or the layout's share of AUTO_BUDGET_S (which counts the timing, not the loading) runs out;
every candidate gets one window at least. A latency is a request's in that loop, waiting for its slot and its
batch included. The choice: the highest throughput among the candidates whose p99 is within LATENCY_BUDGET_MS;
among those within 2 % of it, the lowest p50. If none is within the budget, the lowest p99. Batching is kept
only where it raised the throughput so; it costs a lone request nothing (BATCHING_DELAY_MS 0 takes what waits).
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

from pydantic import BaseModel, Field

from app.core.scheduler import Batchable, BatchingPolicy, Scheduler
from app.engine.runtime import EnsembleRuntime, RuntimeOptions
from app.engine.timing import mean_interval, percentiles_ms
from app.errors import StartupError
from app.settings import Settings
from app.workers import WorkerGroup
from ensemble_contract.modes import Mode, cores_each

logger = logging.getLogger("app")
BATCHING_CANDIDATES = (4, 8, 16)  # rows, besides no batching, up to BATCHING_MAX_ROWS
STABLE_WINDOWS = 3
STABLE_SPREAD = 0.05  # the last STABLE_WINDOWS throughputs within 5 % of their mean
EQUAL_THROUGHPUT = 0.02  # throughputs this close count as equal: the lower p50 wins


@dataclass(frozen=True, order=True)
class SlotLayout:
    slots: int
    threads: int

    @classmethod
    def on(cls, cores: int, slots: int) -> SlotLayout:
        """`slots` slots sharing `cores`."""
        return cls(slots, cores_each(cores, slots))

    def __str__(self) -> str:
        return f"{self.slots}x{self.threads}"


def layouts(cores: int) -> list[SlotLayout]:
    """Slots 1, 2, 4, ... and the cores themselves, each with cores // slots threads per session."""
    slots = sorted({*(2**i for i in range(cores.bit_length())), cores})
    return [SlotLayout.on(cores, s) for s in slots]


class CandidateFigures(BaseModel):
    mode: Mode
    layout: str = Field(description="slots x intra-op threads")
    batching_rows: int = Field(description="The most rows one inference merged (1: no batching).")
    throughput_per_s: float = Field(description="Mean over the windows.")
    throughput_ci95: tuple[float | None, float | None] = Field(description="None with a single window.")
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float = Field(description="Rows an inference ran, on average.")
    windows: int
    stable: bool
    within_budget: bool


class AutoChoice(BaseModel):
    mode: Mode
    layout: str
    slots: int
    threads: int
    batching_rows: int
    reason: str
    latency_budget_ms: float
    measured_s: float
    candidates: list[CandidateFigures] = Field(description="Best first.")

    def flags(self) -> dict[tuple[str, str, int], bool]:
        """Every candidate (mode, layout, batching rows): whether it is the one chosen."""
        return {(c.mode, c.layout, c.batching_rows): c is self.candidates[0] for c in self.candidates}


@dataclass
class _Candidate:
    mode: Mode
    layout: SlotLayout
    batching: BatchingPolicy
    throughputs: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)

    def add(self, window: Window) -> None:
        self.throughputs.append(window.throughput_per_s)
        self.latencies.extend(window.latencies)
        self.batch_rows.extend(window.batch_rows)

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
            batching_rows=self.batching.max_rows,
            throughput_per_s=round(mean, 2),
            throughput_ci95=interval,
            p50_ms=round(p50_ms, 3),
            p99_ms=round(p99_ms, 3),
            mean_batch_rows=round(statistics.fmean(self.batch_rows), 2),
            windows=n,
            stable=self.stable,
            within_budget=p99_ms <= latency_budget_s * 1000,
        )


def batching_options(max_rows: int) -> list[int]:
    """No batching, and BATCHING_CANDIDATES rows capped at max_rows (1: the model or the operator forbids it)."""
    return sorted({1, *(min(rows, max_rows) for rows in BATCHING_CANDIDATES)})


@dataclass(frozen=True)
class Window:
    """One window of a closed loop: its throughput, and each request's latency and the rows of its inference."""

    throughput_per_s: float
    latencies: list[float]
    batch_rows: list[int]


async def closed_loop(
    scheduler: Scheduler, runtime: EnsembleRuntime, mode: Mode, batching: BatchingPolicy, seconds: float
) -> Window:
    """One-row requests of the model's example input through `scheduler`, batched as `batching` says, for `seconds`,
    from as many callers as its slots hold rows of one batch each: what DEFAULT_MODE=auto times (and the benchmarks
    compare with the same traffic over HTTP)."""
    feeds = runtime.manifest.example_inputs(1)
    request = Batchable(mode, mode, 1, batching, feeds, partial(runtime.infer_measured, mode=mode))
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    batch_rows: list[int] = []

    async def caller() -> None:
        while (start := time.perf_counter()) < deadline:
            measured = await scheduler.run(request, math.inf)
            latencies.append(time.perf_counter() - start)
            batch_rows.append(measured.timing.batch_rows)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(scheduler.slots * batching.max_rows)))
    return Window(len(latencies) / (time.perf_counter() - started), latencies, batch_rows)


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


def _time_layout(
    runtime: EnsembleRuntime, layout: SlotLayout, settings: Settings, allowed: BatchingPolicy, budget_s: float
) -> list[_Candidate]:
    """Every candidate (mode x batching, within what `allowed` allows) of one layout, in turns of one window each,
    until all are stable or the budget is spent (one window each at least)."""
    batching = [allowed.at_most(rows) for rows in batching_options(allowed.max_rows)]
    candidates = [_Candidate(mode, layout, policy) for mode in runtime.modes for policy in batching]
    window_s = settings.auto_window_ms / 1000

    async def take_turns() -> None:
        scheduler = Scheduler(layout.slots)
        deadline = time.perf_counter() + budget_s
        try:
            while not candidates[-1].throughputs or (
                time.perf_counter() < deadline and not all(c.stable for c in candidates)
            ):
                for candidate in candidates:
                    window = await closed_loop(scheduler, runtime, candidate.mode, candidate.batching, window_s)
                    candidate.add(window)
        finally:
            scheduler.close()

    asyncio.run(take_turns())
    return candidates


class KeptChoice(BaseModel):
    sha256: str  # of the ensemble it was measured on
    choice: AutoChoice


def choose_once(
    settings: Settings,
    options: RuntimeOptions,
    workers: WorkerGroup,
    candidate_layouts: Sequence[SlotLayout] | None = None,
) -> tuple[EnsembleRuntime, AutoChoice]:
    """`choose`, made by one worker process at a time: the first to load a model measures, the others load its
    choice (N measurements at once would fight over the cores and measure the fight)."""
    with workers.measuring_once():
        kept = workers.measurement()
        if kept is not None:
            previous = KeptChoice.model_validate_json(kept)
            runtime = EnsembleRuntime.load(replace(options, inference_slots=previous.choice.slots))
            if runtime.manifest.ensemble.sha256 == previous.sha256:
                logger.info("auto: serving the choice another worker measured")
                return runtime, previous.choice
            runtime.close()
        runtime, choice = choose(settings, options, candidate_layouts)
        workers.keep_measurement(KeptChoice(sha256=runtime.manifest.ensemble.sha256, choice=choice).model_dump_json())
        return runtime, choice


def choose(
    settings: Settings, options: RuntimeOptions, candidate_layouts: Sequence[SlotLayout] | None = None
) -> tuple[EnsembleRuntime, AutoChoice]:
    """Times every mode under every layout on `options.cores` (or those given) and batching (where the model
    allows it), one layout loaded at a time, and returns the runtime of the chosen layout (the only one left open)
    with the measurement."""
    started = time.perf_counter()
    latency_budget_s = settings.latency_budget_ms / 1000
    every_layout = list(candidate_layouts or layouts(options.cores))
    share_s = settings.auto_budget_s / len(every_layout)
    figures: list[CandidateFigures] = []
    kept: tuple[SlotLayout, EnsembleRuntime] | None = None
    for layout in every_layout:
        runtime = EnsembleRuntime.load(replace(options, inference_slots=layout.slots))
        allowed = BatchingPolicy.allowed(settings, runtime.unbatchable)
        figures += [c.figures(latency_budget_s) for c in _time_layout(runtime, layout, settings, allowed, share_s)]
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
        f"highest throughput ({best.throughput_per_s:.1f}/s in batches of {best.mean_batch_rows:g} rows on "
        f"average, p99 {best.p99_ms:.1f} ms within {settings.latency_budget_ms:g} ms)"
        if best.within_budget
        else f"no candidate kept p99 within {settings.latency_budget_ms:g} ms: the lowest p99 ({best.p99_ms:.1f} ms)"
    ) + f"; {stable} of {timed} candidates stable"
    choice = AutoChoice(
        mode=best.mode,
        layout=best.layout,
        slots=layout.slots,
        threads=runtime.plans[best.mode].intra_op_threads,
        batching_rows=best.batching_rows,
        reason=reason,
        latency_budget_ms=settings.latency_budget_ms,
        measured_s=round(time.perf_counter() - started, 2),
        candidates=ranked,
    )
    return runtime, choice
