"""HTTP load: closed loops (N clients, each sends its next request when the last returns) and open loops
(requests arrive at a fixed mean rate, Poisson, whether or not earlier ones returned). Every loop stops at
a request count or a time limit, whichever comes first.

Open-loop latency runs from each request's scheduled arrival, so a server that falls behind is charged
for the wait (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import httpx
import numpy as np
from pydantic import BaseModel

from bench.stats import Summary

REQUEST_TIMEOUT_S = 30.0
OPEN_LOOP_MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class Payload:
    """One multipart upload (field `file`), encoded once and sent as is."""

    body: bytes
    content_type: str

    @classmethod
    def png(cls, data: bytes) -> Payload:
        request = httpx.Request("POST", "http://localhost/", files={"file": ("shapes.png", data, "image/png")})
        return cls(request.read(), request.headers["content-type"])


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no response (connection error or client timeout)
    seconds: float
    mode: str | None
    server_ms: dict[str, float]  # the response's Server-Timing (the service's own split of its time)
    retry_after: str | None = None
    error: str | None = None  # why there is no response: the client's exception


class LoadResult(BaseModel):
    target: str
    mode: str
    pattern: str  # closed | open
    concurrency: int | None = None
    rate_rps: float | None = None
    sent: int
    ok: int
    error_rate: float
    statuses: dict[str, int]
    transport_errors: dict[str, int] = {}  # status 0 above, by the client's exception
    duration_s: float
    throughput_rps: float
    latency: Summary | None
    refused: Summary | None = None  # the 503s' latency: how fast overload is turned away
    refused_without_retry_after: int = 0
    by_mode: dict[str, Summary]  # by the mode each response reports (splits `compare`)
    server_timing_p50_ms: dict[str, float]  # per Server-Timing metric: its median over the successful responses


def server_timing(header: str) -> dict[str, float]:
    """`a;dur=1.5, b;dur=0.2` -> {"a": 1.5, "b": 0.2}; metrics without a duration are left out."""
    timings = {}
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur" and name:
                with contextlib.suppress(ValueError):
                    timings[name] = float(value)
    return timings


async def _send(client: httpx.AsyncClient, url: str, payload: Payload, started: float, want_mode: bool) -> Outcome:
    try:
        response = await client.post(url, content=payload.body, headers={"content-type": payload.content_type})
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - started, None, {}, error=type(exc).__name__)
    seconds = time.perf_counter() - started
    mode = response.json().get("mode") if want_mode and response.status_code == 200 else None
    timings = server_timing(response.headers.get("server-timing", ""))
    return Outcome(response.status_code, seconds, mode, timings, response.headers.get("retry-after"))


def _result(target: str, mode: str, pattern: str, outcomes: list[Outcome], duration: float, **kw: object) -> LoadResult:
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    by_mode: dict[str, list[float]] = defaultdict(list)
    server: dict[str, list[float]] = defaultdict(list)
    for o in ok:
        if o.mode is not None:
            by_mode[o.mode].append(o.seconds)
        for name, ms in o.server_ms.items():
            server[name].append(ms)
    return LoadResult(
        target=target,
        mode=mode,
        pattern=pattern,
        sent=len(outcomes),
        ok=len(ok),
        error_rate=1 - len(ok) / len(outcomes) if outcomes else 0.0,
        statuses={str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())},
        transport_errors=dict(Counter(o.error for o in outcomes if o.error)),
        duration_s=duration,
        throughput_rps=len(ok) / duration if duration > 0 else 0.0,
        latency=Summary.of([o.seconds for o in ok]) if ok else None,
        refused=Summary.of([o.seconds for o in refused]) if refused else None,
        refused_without_retry_after=sum(o.retry_after is None for o in refused),
        by_mode={m: Summary.of(s) for m, s in sorted(by_mode.items())},
        server_timing_p50_ms={name: float(np.median(ms)) for name, ms in server.items()},
        **kw,  # type: ignore[arg-type]
    )


def _predict_url(base: str, mode: str | None) -> str:
    return f"{base}/predict" + (f"?mode={mode}" if mode else "")


async def closed_loop(
    base: str, target: str, mode: str | None, payload: Payload, *, concurrency: int, requests: int, max_s: float
) -> LoadResult:
    url = _predict_url(base, mode)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    outcomes: list[Outcome] = []
    tickets = itertools.count()
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        deadline = start + max_s

        async def client_loop() -> None:
            while next(tickets) < requests and time.perf_counter() < deadline:
                outcomes.append(await _send(client, url, payload, time.perf_counter(), mode == "compare"))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return _result(target, mode or "default", "closed", outcomes, duration, concurrency=concurrency)


async def open_loop(
    base: str,
    target: str,
    mode: str | None,
    payload: Payload,
    *,
    rate: float,
    requests: int,
    max_s: float,
    seed: int = 0,
) -> LoadResult:
    url = _predict_url(base, mode)
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, requests))
    arrivals = arrivals[arrivals <= max_s]
    limits = httpx.Limits(max_connections=OPEN_LOOP_MAX_CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        tasks = []
        for offset in arrivals:
            scheduled = start + float(offset)
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(_send(client, url, payload, scheduled, mode == "compare")))
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return _result(target, mode or "default", "open", outcomes, duration, rate_rps=rate)


async def warm_up(base: str, mode: str | None, payload: Payload, requests: int) -> None:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(requests):
            await _send(client, _predict_url(base, mode), payload, time.perf_counter(), False)
