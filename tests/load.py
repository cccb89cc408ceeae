"""An HTTP load generator for the overload test: closed loops (N clients, each sending its next request when the
last returns) and open loops (requests arriving at a fixed mean rate, Poisson, whether or not earlier ones have
returned), of one multipart upload to /predict. It reads what `hey` does not: every refusal's Retry-After.
Open-loop latency runs from each request's scheduled arrival, so a server that falls behind is charged for it."""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from app.engine.timing import percentiles_ms

REQUEST_TIMEOUT_S = 30.0
OPEN_LOOP_MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class Upload:
    """One multipart upload (field `file`), encoded once and sent as is."""

    body: bytes
    content_type: str

    @classmethod
    def gradient(cls, size: int) -> Upload:
        """A large grey gradient (size x size): decoding and resizing it dominate the server's work."""
        buffer = io.BytesIO()
        Image.linear_gradient("L").resize((size, size)).convert("RGB").save(buffer, format="PNG")
        request = httpx.Request("POST", "http://x/", files={"file": ("shapes.png", buffer.getvalue(), "image/png")})
        return cls(request.read(), request.headers["content-type"])


@dataclass(frozen=True)
class Reply:
    status: int  # 0: no response (connection error or client timeout)
    seconds: float
    retry_after: str | None = None
    error: str | None = None  # why there is no response: the client's exception


@dataclass(frozen=True)
class Latency:
    seconds: list[float]

    def brief(self) -> str:
        p50, p95 = percentiles_ms(self.seconds, [50, 95])
        return f"p50 {p50:.2f} ms, p95 {p95:.2f} ms (n={len(self.seconds)})"

    @property
    def count(self) -> int:
        return len(self.seconds)


@dataclass
class LoadResult:
    outcomes: list[Reply]
    duration_s: float
    statuses: dict[str, int] = field(init=False)
    transport_errors: dict[str, int] = field(init=False)
    retry_after: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.statuses = {str(k): v for k, v in sorted(Counter(o.status for o in self.outcomes).items())}
        self.transport_errors = dict(Counter(o.error for o in self.outcomes if o.error))
        refused = [o for o in self.outcomes if o.status == 503]
        self.retry_after = dict(Counter(o.retry_after for o in refused if o.retry_after is not None))

    @property
    def ok(self) -> int:
        return sum(o.status == 200 for o in self.outcomes)

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def latency(self) -> Latency | None:
        ok = [o.seconds for o in self.outcomes if o.status == 200]
        return Latency(ok) if ok else None

    @property
    def refused(self) -> Latency | None:
        refused = [o.seconds for o in self.outcomes if o.status == 503]
        return Latency(refused) if refused else None

    @property
    def refused_without_retry_after(self) -> int:
        return sum(o.status == 503 and o.retry_after is None for o in self.outcomes)


async def _send(client: httpx.AsyncClient, url: str, payload: Upload, started: float) -> Reply:
    try:
        response = await client.post(url, content=payload.body, headers={"content-type": payload.content_type})
    except httpx.HTTPError as exc:
        return Reply(0, time.perf_counter() - started, error=type(exc).__name__)
    return Reply(response.status_code, time.perf_counter() - started, response.headers.get("retry-after"))


async def warm_up(base: str, payload: Upload, requests: int) -> None:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(requests):
            await _send(client, f"{base}/predict", payload, time.perf_counter())


async def closed_loop_load(base: str, payload: Upload, *, concurrency: int, requests: int, max_s: float) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    outcomes: list[Reply] = []
    tickets = itertools.count()
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        deadline = start + max_s

        async def client_loop() -> None:
            while next(tickets) < requests and time.perf_counter() < deadline:
                outcomes.append(await _send(client, f"{base}/predict", payload, time.perf_counter()))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        return LoadResult(outcomes, time.perf_counter() - start)


async def open_loop(base: str, payload: Upload, *, rate: float, requests: int, max_s: float) -> LoadResult:
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1 / rate, requests))
    arrivals = arrivals[arrivals <= max_s]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=OPEN_LOOP_MAX_CONNECTIONS)) as client:
        client.timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
        start = time.perf_counter()
        tasks = []
        for offset in arrivals:
            scheduled = start + float(offset)
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(_send(client, f"{base}/predict", payload, scheduled)))
        outcomes = list(await asyncio.gather(*tasks))
        return LoadResult(outcomes, time.perf_counter() - start)
