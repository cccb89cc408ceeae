"""`python -m bench load`: times each service mode in-process (the floor), then drives the naive baseline server
(`python -m bench.peers naive`) and the service with closed loops at concurrency 1, 2, 4, 8 and an open loop at a
fixed rate, per mode and in `compare`; then the service under overload and stalled uploads. Starts the servers
itself on free loopback ports unless --url names a running service (the overloaded one is always its own).
About 7 min on 2 cores.

Overload: a service with one inference slot and a queue of 8, on one core (the load generator, this process, on
the others, as they would be on separate machines), sent large PNGs (decoding them dominates its work, so the
generator can offer 4x what it can take). A round: one client alone (the service time), 4 clients (saturation),
then an open loop at 4x saturation; and one upload that stalls after its headers (time to its 408). The figures
are ratios over the rounds with 95 % intervals; the tests (tests/test_overload.py, tests/test_reliability_bodies.py)
keep what must always hold: statuses, Retry-After, no dropped connection, memory, the 408 itself.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image
from pydantic import BaseModel

from bench.core import Budget, Machine, MeasureSpec, Summary, log, measure_isolated, service_modes, service_runner_name
from bench.http_load import (
    LOOPBACK,
    LoadResult,
    PartialRequest,
    Payload,
    Server,
    closed_loop,
    free_port,
    open_loop,
    resident_bytes,
    started,
    wait_ready,
    warm_up,
)
from ensemble_contract.manifest import load_manifest
from model_build.shapes import TEST_SET_SEED, render

IMAGE_SIZE = 128  # the uploaded picture; the service resizes it to the model's input
OPEN_LOOP_LOAD = 0.25  # default open-loop rate, as a fraction of the slowest mode's in-process capacity
_RSS_METRIC = re.compile(r"^process_resident_memory_bytes\s+([0-9.e+]+)$", re.MULTILINE)

OVERLOAD_SLOTS, OVERLOAD_QUEUE = 1, 8
OVERLOAD_FACTOR = 4  # the open loop's rate, times the saturation throughput
OVERLOAD_IMAGE_SIZE = 1200
OVERLOAD_CLIENTS = 4  # closed-loop clients that keep the slot and queue busy: the saturation throughput
BODY_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class LoadPlan:
    concurrencies: tuple[int, ...]
    requests: int  # per load point
    max_s: float  # per load point
    warmup: int  # requests before each mode's points
    floor: Budget  # the in-process timing of each mode
    overload_rounds: int
    overload_s: float  # each window of an overload round


class OverloadRound(BaseModel):
    alone: LoadResult  # one client: the service time
    saturated: LoadResult  # OVERLOAD_CLIENTS clients
    overload: LoadResult  # the open loop at OVERLOAD_FACTOR x the saturated throughput
    stalled_upload_s: float  # from connecting to the 408 of an upload that stops after its headers
    stalled_upload_status: int


class LoadReport(BaseModel):
    machine: Machine
    model_dir: str
    model_sha256: str
    service_url: str
    open_rate_rps: float
    floor: dict[str, Summary]  # service mode -> in-process latency, one inference at a time
    results: list[LoadResult]
    service_rss_idle_bytes: int | None
    service_rss_after_bytes: int | None
    baseline_rss_after_bytes: int | None
    overload: list[OverloadRound]
    overload_pinned: bool  # the overloaded service on one core, the generator on the others


def shapes_png(size: int = IMAGE_SIZE) -> bytes:
    image, _, _ = render(TEST_SET_SEED, size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def measure_floor(model_dir: Path, modes: Sequence[str], plan: LoadPlan) -> dict[str, Summary]:
    """Each of the service's `modes` in-process through its own runtime, one process per mode."""
    floor = {}
    for mode in modes:
        name = service_runner_name(mode)
        floor[mode] = measure_isolated(MeasureSpec.of(model_dir, (name,), plan.floor)).results[name]
    return floor


async def load_target(
    server: Server, target: str, modes: Sequence[str | None], payload: Payload, plan: LoadPlan, rate: float
) -> list[LoadResult]:
    """Every mode: the closed loops at each concurrency, then the open loop at `rate`."""
    results = []
    for mode in modes:
        await warm_up(server.url, mode, payload, plan.warmup)
        for concurrency in plan.concurrencies:
            results.append(
                await closed_loop(
                    server.url, target, mode, payload, concurrency=concurrency, requests=plan.requests, max_s=plan.max_s
                )
            )
            log(_line(results[-1]))
        results.append(
            await open_loop(server.url, target, mode, payload, rate=rate, requests=plan.requests, max_s=plan.max_s)
        )
        log(_line(results[-1]))
    return results


def _line(r: LoadResult) -> str:
    load = f"c={r.concurrency}" if r.pattern == "closed" else f"{r.rate_rps:.1f} rps open"
    latency = r.latency.brief() if r.latency else "no successful request"
    return (
        f"[load] {r.target:>8} {r.mode:<10} {load:<14} {latency}, {r.throughput_rps:.1f} rps, errors {r.error_rate:.1%}"
    )


def service_rss(server: Server) -> int | None:
    """From the service's /metrics (process collector), else from /proc when this bench started it."""
    try:
        match = _RSS_METRIC.search(httpx.get(server.url + "/metrics", timeout=5).text)
        if match:
            return int(float(match[1]))
    except httpx.HTTPError:
        pass
    return resident_bytes(server.pid) if server.pid else None


def run_baseline(
    model_dir: Path, payload: Payload, plan: LoadPlan, rate: float, out: Path
) -> tuple[list[LoadResult], int | None]:
    port = free_port()
    args = ["--model-dir", str(model_dir), "--port", str(port)]
    with started(["-m", "bench.peers", "naive", *args], {}, port, out / "baseline.log", "/healthz") as server:
        results = asyncio.run(load_target(server, "baseline", [None], payload, plan, rate))
        return results, resident_bytes(server.pid) if server.pid else None


def run_service(
    url: str | None,
    model_dir: Path,
    payload: Payload,
    plan: LoadPlan,
    rate: float,
    out: Path,
) -> tuple[str, list[LoadResult], int | None, int | None]:
    """Loads the service at `url`, or one started here on `model_dir`, in every mode it serves and `compare`."""
    if url:
        server = Server(url.rstrip("/"), None)
        wait_ready(server.url, "/readyz", 30)
        return _load_service(server, model_dir, payload, plan, rate)
    port = free_port()
    env = {"MODEL_DIR": str(model_dir), "PORT": str(port), "HOST": LOOPBACK, "LOG_LEVEL": "warning"}
    with started(["-m", "app"], env, port, out / "service.log", "/readyz") as server:
        return _load_service(server, model_dir, payload, plan, rate)


def _load_service(
    server: Server, model_dir: Path, payload: Payload, plan: LoadPlan, rate: float
) -> tuple[str, list[LoadResult], int | None, int | None]:
    ready = httpx.get(server.url + "/readyz", timeout=5).json()
    if ready.get("sha256") != load_manifest(model_dir).ensemble.sha256:
        log(f"[load] warning: {server.url} serves another model than {model_dir}; the floor and baseline differ")
    modes = [*ready["modes"], "compare"]
    idle = service_rss(server)
    results = asyncio.run(load_target(server, "service", modes, payload, plan, rate))
    return server.url, results, idle, service_rss(server)


@contextmanager
def _generator_off(core: int | None) -> Iterator[None]:
    """This process (the load generator) off `core` while the block runs (None: where it is)."""
    cores = os.sched_getaffinity(0)
    if core is not None:
        os.sched_setaffinity(0, cores - {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def _stalled_upload(url: str) -> tuple[float, int]:
    """Seconds from connecting to the answer of an image upload that stops after its headers, and its status."""
    started_at = time.monotonic()
    with PartialRequest(url, "/predict", {"Content-Type": "image/png", "Content-Length": "5000"}) as request:
        status = request.answer().status
    return time.monotonic() - started_at, status


async def _overload_round(url: str, payload: Payload, seconds: float) -> OverloadRound:
    alone = await closed_loop(url, "overload", None, payload, concurrency=1, requests=60, max_s=seconds)
    saturated = await closed_loop(
        url, "overload", None, payload, concurrency=OVERLOAD_CLIENTS, requests=10_000, max_s=seconds
    )
    rate = OVERLOAD_FACTOR * saturated.throughput_rps
    offered = int(rate * seconds) + 1
    overload = await open_loop(url, "overload", None, payload, rate=rate, requests=offered, max_s=seconds)
    stalled_s, status = await asyncio.to_thread(_stalled_upload, url)
    return OverloadRound(
        alone=alone, saturated=saturated, overload=overload, stalled_upload_s=stalled_s, stalled_upload_status=status
    )


def run_overload(model_dir: Path, plan: LoadPlan, out: Path) -> tuple[list[OverloadRound], bool]:
    """The overload rounds against a service of one slot and a short queue, started here; and whether it ran on
    a core of its own."""
    server_core, *others = sorted(os.sched_getaffinity(0))
    pinned = bool(others)
    port = free_port()
    env = {
        "MODEL_DIR": str(model_dir),
        "PORT": str(port),
        "HOST": LOOPBACK,
        "LOG_LEVEL": "warning",
        "INFERENCE_SLOTS": str(OVERLOAD_SLOTS),
        "MAX_QUEUE": str(OVERLOAD_QUEUE),
        "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    if not pinned:
        log("[load] one core only: the overloaded service and the load generator share it")
    payload = Payload.gradient(OVERLOAD_IMAGE_SIZE)
    cores = {server_core} if pinned else None
    rounds = []
    with (
        started(["-m", "app"], env, port, out / "overload.log", "/readyz", cores=cores) as server,
        _generator_off(server_core if pinned else None),
    ):
        asyncio.run(warm_up(server.url, None, payload, plan.warmup))
        for turn in range(plan.overload_rounds):
            rounds.append(asyncio.run(_overload_round(server.url, payload, plan.overload_s)))
            r = rounds[-1]
            log(
                f"[load] overload round {turn + 1}: saturation {r.saturated.throughput_rps:.1f} rps, offered "
                f"{OVERLOAD_FACTOR}x: {r.overload.statuses}; stalled upload {r.stalled_upload_status} after "
                f"{r.stalled_upload_s:.2f} s"
            )
    return rounds, pinned


def run(url: str | None, model_dir: Path, plan: LoadPlan, rate: float | None, out: Path) -> LoadReport:
    manifest = load_manifest(model_dir)
    payload = Payload.png(shapes_png())
    modes = service_modes(model_dir)
    log(f"[load] in-process floor of {', '.join(modes)} on {model_dir}")
    floor = measure_floor(model_dir, modes, plan)
    for mode, summary in floor.items():
        log(f"[load] in-process {mode:<10} {summary.brief()}")
    rate = rate or round(OPEN_LOOP_LOAD * 1000 / max(s.mean_ms for s in floor.values()), 1)
    baseline, baseline_rss = run_baseline(model_dir, payload, plan, rate, out)
    service_url, service, idle_rss, after_rss = run_service(url, model_dir, payload, plan, rate, out)
    overload, pinned = run_overload(model_dir, plan, out)
    return LoadReport(
        machine=Machine.current(),
        model_dir=str(model_dir),
        model_sha256=manifest.ensemble.sha256,
        service_url=service_url,
        open_rate_rps=rate,
        floor=floor,
        results=[*baseline, *service],
        service_rss_idle_bytes=idle_rss,
        service_rss_after_bytes=after_rss,
        baseline_rss_after_bytes=baseline_rss,
        overload=overload,
        overload_pinned=pinned,
    )
