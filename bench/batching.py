"""`python -m bench batching --model-dir DIR`: what batching buys, in-process and over HTTP.

In-process, through the service's scheduler (app.core.auto.closed_loop, what DEFAULT_MODE=auto times): in each
layout (slots x threads) and mode, the saturated throughput of one-row requests unbatched and in batches of up to
--rows rows, the setups taking turns round by round. Over HTTP: the service in each layout, first mode, batching
on, `hey` sending the v2 JSON request (as `bench peers` does) from twice as many clients as its batches hold, in
the same rounds: HTTP ÷ in-process, the share of the runtime's throughput that reaches clients.
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
from bench.common import Interval, Report, interleave, interval_check, log, table
from bench.service import service_process
from bench.serving import hey, requested_outputs, v2_body
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
    infer = f"/v2/models/{manifest.name}/infer"
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
            servers[setup] = stack.enter_context(service_process(model_dir, work, **settings)).url + infer
            hey(servers[setup], body, clients=1, requests=10)

        def measure(key: tuple[str, Setup]) -> float:
            where, setup = key
            if where == "in-process":
                return in_process(runtimes[setup.layout], setup, seconds)
            clients = setup.layout.slots * setup.rows * 2
            return hey(servers[setup], body, clients=clients, seconds=seconds).goodput

        keys = [("in-process", s) for s in setups] + [("http", s) for s in over_http]
        log(f"[batching] {rounds} rounds of {len(keys)} measurements of {seconds:g} s")
        figures = interleave(keys, rounds, measure)
    return Report(report(model_dir, manifest.name, setups, over_http, figures, rows, rounds, seconds))


def report(
    model_dir: Path,
    name: str,
    setups: Sequence[Setup],
    over_http: Sequence[Setup],
    figures: dict[tuple[str, Setup], list[float]],
    rows: int,
    rounds: int,
    seconds: float,
) -> str:
    lines, checks = [], []
    for setup in (s for s in setups if s.rows > 1):
        alone = Setup(setup.layout, setup.mode, 1)
        batched, unbatched = figures["in-process", setup], figures["in-process", alone]
        gain = Interval.of_ratios(batched, unbatched)
        lines.append([str(setup.mode), str(setup.layout), Interval.of(unbatched).brief(), Interval.of(batched).brief(),
                      gain.brief()])  # fmt: skip
        checks.append(interval_check(f"batched ÷ unbatched, {setup.mode} {setup.layout}", gain, at_least=1.3))
    best_without = max((s for s in setups if s.rows == 1), key=lambda s: Interval.of(figures["in-process", s]).mean)
    best_with = max((s for s in setups if s.rows > 1), key=lambda s: Interval.of(figures["in-process", s]).mean)
    best = Interval.of_ratios(figures["in-process", best_with], figures["in-process", best_without])
    checks.append(interval_check(f"best batched ({best_with}) ÷ best unbatched ({best_without})", best, at_least=1.3))
    http_rows = []
    for setup in over_http:
        share = Interval.of_ratios(figures["http", setup], figures["in-process", setup])
        http_rows.append([str(setup), Interval.of(figures["http", setup]).brief(), share.brief()])
        checks.append(interval_check(f"HTTP ÷ in-process, {setup}", share, at_least=0.7))
    header = (
        f"Model directory {model_dir} ({name}); {rounds} interleaved rounds of {seconds:g} s per measurement; "
        f"batches of up to {rows} rows against none, in requests a second [95 % CI]."
    )
    in_process_table = table(["mode", "layout", "unbatched /s", f"batched ({rows}) /s", "batched ÷ unbatched"], lines)
    http_table = table(["setup", "over HTTP /s", "HTTP ÷ in-process"], http_rows)
    return "\n\n".join([header, in_process_table, http_table, "\n".join(f"- {c}" for c in checks)])
