"""Admission control: bounded tickets, one inference slot shared by every mode, timeouts that keep the slot
until the inference really ends; and the same, end to end, on a real server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import pytest

from app.admission import Admission
from app.errors import InferenceTimeout, Overloaded
from app.settings import Settings
from tests.support import LiveServer, live_server, png_bytes

SHORT_TIMEOUT_S = 0.3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_tickets_beyond_slots_and_queue_are_refused() -> None:
    admission = Admission(slots=1, max_queue=1)
    with admission.ticket(), admission.ticket():
        with pytest.raises(Overloaded) as refused, admission.ticket():
            pass
        assert refused.value.headers["Retry-After"] == "1"
    with admission.ticket():
        assert admission.admitted == 1
    admission.close()


@pytest.mark.anyio
async def test_work_runs_off_the_event_loop_and_returns_its_value() -> None:
    admission = Admission(slots=1, max_queue=0)
    loop_thread = threading.get_ident()
    admitted = await admission.run(threading.get_ident, timeout_s=5)
    assert admitted.value != loop_thread
    assert admitted.waited_s >= 0
    admission.close()


@pytest.mark.anyio
async def test_a_timed_out_inference_keeps_its_slot_until_it_ends() -> None:
    admission = Admission(slots=1, max_queue=0)
    release = threading.Event()
    with pytest.raises(InferenceTimeout, match="did not finish"):
        await admission.run(release.wait, timeout_s=SHORT_TIMEOUT_S)
    with pytest.raises(InferenceTimeout, match="no inference slot"):
        await admission.run(lambda: "second", timeout_s=SHORT_TIMEOUT_S)
    release.set()
    assert (await admission.run(lambda: "third", timeout_s=5)).value == "third"
    admission.close()


# End to end: the test occupies the server's only inference slot through the server's own Admission, on the
# server's event loop, so "busy" is a fact and not a race.


@pytest.fixture(scope="module")
def strict_server(model_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(
        model_dir=model_dir, max_concurrent_inferences=1, max_queue=0, request_timeout_s=SHORT_TIMEOUT_S
    )
    with live_server(settings) as live:
        yield live


@contextmanager
def holding_the_slot(server: LiveServer, *, with_ticket: bool) -> Iterator[None]:
    """Occupies the server's inference slot (with a ticket: its whole admission capacity) until the block ends."""
    running, release = threading.Event(), threading.Event()

    def work() -> None:
        running.set()
        release.wait()

    async def hold() -> None:
        admission = server.dataplane.admission
        with admission.ticket() if with_ticket else nullcontext():
            await admission.run(work, timeout_s=60)

    held = asyncio.run_coroutine_threadsafe(hold(), server.loop)
    assert running.wait(timeout=30)
    try:
        yield
    finally:
        release.set()
        held.result(timeout=30)


def post_image(client: httpx.Client) -> httpx.Response:
    return client.post("/predict", content=png_bytes(), headers={"Content-Type": "image/png"})


def test_overload_is_refused_at_once_with_retry_after(strict_server: LiveServer) -> None:
    with (
        strict_server.client() as client,
        holding_the_slot(strict_server, with_ticket=True),
        ThreadPoolExecutor(4) as pool,
    ):
        responses = list(pool.map(lambda _: post_image(client), range(4)))
    for response in responses:
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
    with strict_server.client() as client:
        assert post_image(client).status_code == 200


def test_no_slot_within_the_timeout_is_504_and_the_loop_keeps_serving(strict_server: LiveServer) -> None:
    with strict_server.client() as client, holding_the_slot(strict_server, with_ticket=False):
        assert client.get("/healthz").status_code == 200
        response = post_image(client)
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    registry = strict_server.app.state.metrics.registry
    assert registry.get_sample_value("ensemble_predictions_total", {"mode": "fused", "outcome": "timeout"}) == 1
    with strict_server.client() as client:
        assert post_image(client).status_code == 200
