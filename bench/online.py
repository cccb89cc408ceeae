"""The load command: the in-process floor, the naive baseline server and the service, under the same load."""

from __future__ import annotations

import asyncio
import io
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image
from pydantic import BaseModel

from bench.isolated import measure_isolated
from bench.load import LoadResult, Payload, closed_loop, open_loop, warm_up
from bench.machine import Machine
from bench.server import LOOPBACK, Server, free_port, resident_bytes, started, wait_ready
from bench.service_runtime import service_modes, service_runner_name
from bench.stats import Summary
from bench.timing import Budget
from bench.worker import MeasureSpec
from ensemble_contract.manifest import load_manifest
from model_build.shapes import TEST_SET_SEED, render

IMAGE_SIZE = 128  # the uploaded picture; the service resizes it to the model's input
OPEN_LOOP_LOAD = 0.25  # default open-loop rate, as a fraction of the slowest mode's in-process capacity
_RSS_METRIC = re.compile(r"^process_resident_memory_bytes\s+([0-9.e+]+)$", re.MULTILINE)


@dataclass(frozen=True)
class LoadPlan:
    concurrencies: tuple[int, ...]
    requests: int  # per load point
    max_s: float  # per load point
    warmup: int  # requests before each mode's points
    floor: Budget  # the in-process timing of each mode


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
        spec = MeasureSpec(
            model_dir=model_dir,
            rotation=(name,),
            warmup=plan.floor.warmup,
            runs=plan.floor.runs,
            max_seconds=plan.floor.max_seconds,
        )
        floor[mode] = measure_isolated(spec).results[name]
    return floor


async def load_target(
    server: Server,
    target: str,
    modes: Sequence[str | None],
    payload: Payload,
    plan: LoadPlan,
    rate: float,
    log: Callable[[str], None],
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
    model_dir: Path, payload: Payload, plan: LoadPlan, rate: float, out: Path, log: Callable[[str], None]
) -> tuple[list[LoadResult], int | None]:
    port = free_port()
    args = ["--model-dir", str(model_dir), "--port", str(port)]
    with started(["-m", "bench.baseline_server", *args], {}, port, out / "baseline.log", "/healthz") as server:
        results = asyncio.run(load_target(server, "baseline", [None], payload, plan, rate, log))
        return results, resident_bytes(server.pid) if server.pid else None


def run_service(
    url: str | None,
    model_dir: Path,
    payload: Payload,
    plan: LoadPlan,
    rate: float,
    out: Path,
    log: Callable[[str], None],
) -> tuple[str, list[LoadResult], int | None, int | None]:
    """Loads the service at `url`, or one started here on `model_dir`, in every mode it serves and `compare`."""
    if url:
        server = Server(url.rstrip("/"), None)
        wait_ready(server.url, "/readyz", 30)
        return _load_service(server, model_dir, payload, plan, rate, log)
    port = free_port()
    env = {"MODEL_DIR": str(model_dir), "PORT": str(port), "HOST": LOOPBACK, "LOG_LEVEL": "warning"}
    with started(["-m", "app"], env, port, out / "service.log", "/readyz") as server:
        return _load_service(server, model_dir, payload, plan, rate, log)


def _load_service(
    server: Server, model_dir: Path, payload: Payload, plan: LoadPlan, rate: float, log: Callable[[str], None]
) -> tuple[str, list[LoadResult], int | None, int | None]:
    ready = httpx.get(server.url + "/readyz", timeout=5).json()
    if ready.get("sha256") != load_manifest(model_dir).ensemble.sha256:
        log(f"[load] warning: {server.url} serves another model than {model_dir}; the floor and baseline differ")
    modes = [*ready["modes"], "compare"]
    idle = service_rss(server)
    results = asyncio.run(load_target(server, "service", modes, payload, plan, rate, log))
    return server.url, results, idle, service_rss(server)


def run(
    url: str | None,
    model_dir: Path,
    plan: LoadPlan,
    rate: float | None,
    out: Path,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> LoadReport:
    manifest = load_manifest(model_dir)
    payload = Payload.png(shapes_png())
    modes = service_modes(model_dir)
    log(f"[load] in-process floor of {', '.join(modes)} on {model_dir}")
    floor = measure_floor(model_dir, modes, plan)
    for mode, summary in floor.items():
        log(f"[load] in-process {mode:<10} {summary.brief()}")
    rate = rate or round(OPEN_LOOP_LOAD * 1000 / max(s.mean_ms for s in floor.values()), 1)
    baseline, baseline_rss = run_baseline(model_dir, payload, plan, rate, out, log)
    service_url, service, idle_rss, after_rss = run_service(url, model_dir, payload, plan, rate, out, log)
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
    )
