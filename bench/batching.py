"""`python -m bench batching --model-dir DIR`: what batching buys, in-process and over HTTP.

In-process (the scheduler's closed loop, as DEFAULT_MODE=auto times it), each layout and mode's saturated throughput
of one-row requests, unbatched and in batches of up to --rows; over HTTP (`hey`, twice as many clients as a batch
holds), the share of it that reaches clients. Every setup takes its turn in each round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from app.core.auto import SlotLayout, closed_loop, layouts
from app.core.model import runtime_options
from app.core.scheduler import BatchingPolicy, Scheduler
from app.engine.resources import usable_cores
from app.engine.runtime import EnsembleRuntime
from app.settings import Settings
from bench.common import Interval, Report, interleave, log, table
from bench.service import service_process
from bench.serving import Target, hey, requested_outputs, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode, served_modes

WARMUP_S = 0.5


@dataclass(frozen=True)
class Setup:
    layout: SlotLayout
    mode: Mode
    rows: int  # the most rows an inference merges (1: no batching)

    def __str__(self) -> str:
        return f"{self.mode} {self.layout} " + (f"batches of {self.rows}" if self.rows > 1 else "no batching")


def in_process(runtime: EnsembleRuntime, setup: Setup, seconds: float) -> float:
    """Saturated throughput (requests a second) of one setup, after a short warm-up."""

    async def measure() -> float:
        scheduler, batching = Scheduler(setup.layout.slots), BatchingPolicy(setup.rows)
        try:
            await closed_loop(scheduler, runtime, setup.mode, batching, WARMUP_S)
            return (await closed_loop(scheduler, runtime, setup.mode, batching, seconds)).throughput_per_s
        finally:
            scheduler.close()

    return asyncio.run(measure())


def run(model_dir: Path, modes: Sequence[Mode] | None, rows: int, rounds: int, seconds: float, work: Path) -> Report:
    manifest = load_manifest(model_dir)
    modes = [m for m in (modes or served_modes(manifest)) if m in served_modes(manifest)]
    every_layout = layouts(usable_cores().count)
    setups = [Setup(layout, mode, r) for layout in every_layout for mode in modes for r in (1, rows)]
    over_http = [s for s in setups if s.mode is modes[0] and s.rows == rows]
    body = v2_body(manifest, modes[0], work / "batching.json", requested_outputs(manifest))
    with ExitStack() as stack:
        runtimes = {}
        for layout in every_layout:
            runtime = EnsembleRuntime.load(runtime_options(Settings(model_dir=model_dir, inference_slots=layout.slots)))
            stack.callback(runtime.close)
            runtimes[layout] = runtime
        if any(runtime.unbatchable for runtime in runtimes.values()):
            return Report(f"Model directory {model_dir} never batches: {runtimes[every_layout[0]].unbatchable}.")
        servers = {}
        for setup in over_http:
            log(f"[batching] starting the service: {setup}")
            settings = {"INFERENCE_SLOTS": setup.layout.slots, "DEFAULT_MODE": setup.mode, "BATCHING_MAX_ROWS": rows}
            url = stack.enter_context(service_process(model_dir, work, **settings)).url
            hey(servers.setdefault(setup, Target(str(setup), f"{url}/v2/models/{manifest.name}/infer", body)), 1)

        def measure(key: tuple[str, Setup]) -> float:
            where, setup = key
            if where == "in-process":
                return in_process(runtimes[setup.layout], setup, seconds)
            return hey(servers[setup], setup.layout.slots * setup.rows * 2, seconds).goodput

        keys = [("in-process", s) for s in setups] + [("http", s) for s in over_http]
        log(f"[batching] {rounds} rounds of {len(keys)} measurements of {seconds:g} s")
        figures = interleave(keys, rounds, measure)
    header = (
        f"Model directory {model_dir} ({manifest.name}); {rounds} interleaved rounds of {seconds:g} s per measurement; "
        f"batches of up to {rows} rows against none, in requests a second [95 % CI]."
    )
    return Report("\n\n".join([header, *tables(setups, over_http, figures, rows)]))


def tables(setups: Sequence[Setup], over_http: Sequence[Setup], figures: dict[tuple[str, Setup], list[float]],
           rows: int) -> list[str]:  # fmt: skip
    """In-process batched ÷ unbatched per setup, over HTTP ÷ in-process, and the checks."""
    in_process = {setup: figures["in-process", setup] for setup in setups}
    lines, http_rows, checks = [], [], []
    for setup in (s for s in setups if s.rows > 1):
        unbatched = in_process[Setup(setup.layout, setup.mode, 1)]
        gain = Interval.of_ratios(in_process[setup], unbatched)
        cells = (Interval.of(unbatched), Interval.of(in_process[setup]), gain)
        lines.append([str(setup.mode), str(setup.layout), *(cell.brief() for cell in cells)])
        checks.append(gain.check(f"batched ÷ unbatched, {setup.mode} {setup.layout}", at_least=1.3))
    best = {
        batched: max((s for s in setups if (s.rows > 1) == batched), key=lambda s: Interval.of(in_process[s]).mean)
        for batched in (False, True)
    }
    gain = Interval.of_ratios(in_process[best[True]], in_process[best[False]])
    checks.append(gain.check(f"best batched ({best[True]}) ÷ best unbatched ({best[False]})", at_least=1.3))
    for setup in over_http:
        share = Interval.of_ratios(figures["http", setup], in_process[setup])
        http_rows.append([str(setup), Interval.of(figures["http", setup]).brief(), share.brief()])
        checks.append(share.check(f"HTTP ÷ in-process, {setup}", at_least=0.7))
    return [
        table(["mode", "layout", "unbatched /s", f"batched ({rows}) /s", "batched ÷ unbatched"], lines),
        table(["setup", "over HTTP /s", "HTTP ÷ in-process"], http_rows),
        "\n".join(f"- {c}" for c in checks),
    ]
