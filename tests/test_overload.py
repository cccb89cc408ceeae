"""Overload: at 4x the service's saturation throughput, accepted requests keep a bounded p99, the rest are
turned away at once with 503 and Retry-After, nothing crashes, and resident memory comes back.

The CI version offers the overload for 10 s; the soak versions (`pytest -m soak`) for 60 s and 10 minutes.
The server runs on one core and the load generator on the other, as they would on separate machines (on a
shared core, the generator's own backlog would be charged to the server). The requests are large PNGs
(1200x1200), so the server's own work (decoding, resizing) dominates each request and the generator can
offer 4x what the server can take.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bench.http_load import LoadResult, Payload, closed_loop, open_loop, warm_up
from tests.service_process import ServiceProcess, service_process

MAX_QUEUE = 8
SLOTS = 1
OVERLOAD = 4
SATURATION_S = 4.0
WARM_UP_S = 3.0
# An accepted request waits behind at most MAX_QUEUE + SLOTS others, each served in about the time one takes
# alone: that many service times bound its p99 (times 3 for the refusals' share of the server's core and for
# a noisy machine). Measured here: p99 about 0.7 s against a bound of about 6 s.
P99_BOUND_SERVICE_TIMES = 3 * (MAX_QUEUE + SLOTS + 1)
# A 503 reads the body and answers: no decoding, no waiting, and the event loop that does it outranks the
# decoding and inference threads (app/priority.py). Measured here: p50 7-9 ms, p95 16-20 ms on a quiet machine;
# once in CI, with the VM's core busy elsewhere, p50 12 ms and p95 334 ms. So the median has an absolute bound,
# and the tail a relative one: even the slow refusals come back faster than a typical accepted request.
REFUSAL_P50_BOUND_MS = 50.0
MEMORY_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    log_dir = tmp_path_factory.mktemp("overload")
    server_core, *others = sorted(os.sched_getaffinity(0))
    if not others:
        pytest.skip("needs two cores: one for the server, one for the load generator")
    generator_cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, others)
    try:
        with service_process(
            model_dir, log_dir, cores={server_core}, max_queue=MAX_QUEUE, inference_slots=SLOTS
        ) as process:
            yield process
    finally:
        os.sched_setaffinity(0, generator_cores)


@pytest.fixture(scope="module")
def payload() -> Payload:
    gradient = Image.linear_gradient("L").resize((1200, 1200)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")
    return Payload.png(buffer.getvalue())


def saturation(service: ServiceProcess, payload: Payload) -> tuple[LoadResult, LoadResult]:
    """One client alone (the service time), then enough clients to keep the slot and queue busy."""
    alone = asyncio.run(closed_loop(service.url, "service", None, payload, concurrency=1, requests=60, max_s=3))
    busy = asyncio.run(
        closed_loop(service.url, "service", None, payload, concurrency=4, requests=10_000, max_s=SATURATION_S)
    )
    return alone, busy


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(10, id="ci-10s"),
        pytest.param(60, id="60s", marks=pytest.mark.soak),
        pytest.param(600, id="soak-10min", marks=pytest.mark.soak),
    ],
)
def test_four_times_saturation(service: ServiceProcess, payload: Payload, seconds: int) -> None:
    asyncio.run(warm_up(service.url, None, payload, 10))
    alone, busy = saturation(service, payload)
    assert alone.latency is not None and busy.error_rate == 0, busy.statuses
    rate = OVERLOAD * busy.throughput_rps

    def overload(seconds: float) -> LoadResult:
        offered = int(rate * seconds) + 1
        return asyncio.run(open_loop(service.url, "service", None, payload, rate=rate, requests=offered, max_s=seconds))

    overload(WARM_UP_S)  # the allocator's high-water mark of this load shape: after it, growth is a leak
    rss_before = service.rss_bytes()
    result = overload(seconds)

    print(
        f"\nsaturation {busy.throughput_rps:.0f} req/s, offered {rate:.0f} req/s for {seconds} s: {result.statuses}; "
        f"accepted {result.latency.brief() if result.latency else '-'}; "
        f"refused {result.refused.brief() if result.refused else '-'}"
    )
    # No 5xx but overload, and no dropped connection.
    assert set(result.statuses) <= {"200", "503"}, (result.statuses, result.transport_errors)
    assert result.ok > 0 and result.refused is not None
    assert result.refused_without_retry_after == 0
    assert result.refused.median_ms <= REFUSAL_P50_BOUND_MS
    assert result.latency is not None
    assert result.refused.p95_ms < result.latency.median_ms
    assert result.latency.p99_ms <= P99_BOUND_SERVICE_TIMES * alone.latency.p99_ms
    assert result.throughput_rps >= 0.5 * busy.throughput_rps  # overload does not collapse the goodput

    assert service.process.poll() is None
    with service.client() as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", content=payload.body, headers={"content-type": payload.content_type}).is_success
    rss_after = service.rss_bytes()
    assert abs(rss_after - rss_before) <= MEMORY_TOLERANCE * rss_before, (rss_before, rss_after)
