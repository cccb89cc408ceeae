"""Admission control and scheduling: bounded tickets, one inference slot shared by every mode, timeouts that keep
the slot until the inference really ends; and the same, end to end, on a real server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.core.admission import Admission
from app.core.scheduler import Scheduler
from app.errors import InferenceTimeout, Overloaded
from app.settings import Settings
from bench.service import png_bytes
from ensemble_contract.manifest import Manifest
from tests.support import LiveServer, PartialRequest, holding_the_slot, live_server, stand_in

SHORT_TIMEOUT_S = 0.3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_tickets_beyond_slots_and_queue_are_refused() -> None:
    admission = Admission(Scheduler(slots=1), max_queue=1, max_wait_s=60)
    with admission.ticket(), admission.ticket():
        with pytest.raises(Overloaded) as refused, admission.ticket():
            pass
        assert refused.value.headers["Retry-After"] == "1"
    with admission.ticket():
        assert admission.admitted == 1
    admission.scheduler.close()


def test_the_expected_wait_counts_rows_so_big_requests_pay_for_their_size() -> None:
    scheduler = Scheduler(slots=1)
    admission = Admission(scheduler, max_queue=100, max_wait_s=0.1)
    scheduler.assume_run_s(0.02)  # a run of one row (rows_per_run: 1 until runs are measured)
    with admission.ticket(rows=1):  # one row running
        assert admission.expected_wait_s(rows=1) == pytest.approx(0.02)  # it waits for that run
        assert admission.expected_wait_s(rows=8) == pytest.approx(0.16)  # and its own rows run after it
        assert admission.refusal(rows=1) is None
        refused = admission.refusal(rows=8)
        assert refused is not None and "would wait 160 ms" in refused.message
    with admission.ticket(rows=4):  # four rows admitted weigh as four one-row requests
        assert admission.admitted_rows == 4 and admission.expected_wait_s(rows=1) == pytest.approx(0.08)
    assert admission.admitted == admission.admitted_rows == 0
    scheduler.close()


@pytest.mark.anyio
async def test_the_queue_is_bounded_by_the_expected_wait_not_only_by_count() -> None:
    scheduler = Scheduler(slots=2)
    admission = Admission(scheduler, max_queue=100, max_wait_s=0.05)
    assert admission.refusal() is None  # nothing measured yet: only the count bounds the queue
    await scheduler.run(stand_in(lambda: time.sleep(0.02)), timeout_s=5)
    assert scheduler.service_s is not None and scheduler.service_s >= 0.02  # a sleep lasts at least its time
    scheduler.assume_run_s(0.02)  # what was measured, made exact for the arithmetic below
    tickets = [admission.ticket() for _ in range(6)]
    for ticket in tickets:  # 6 in the pipeline on 2 slots: the 7th waits (7 - 2) / 2 x 20 ms = 50 ms, in budget
        ticket.__enter__()
    assert admission.expected_wait_s() == pytest.approx(0.05)
    assert admission.refusal() is None
    with admission.ticket():  # the 8th would wait 60 ms
        refused = admission.refusal()
        assert refused is not None and "would wait 60 ms" in refused.message
        assert refused.headers["Retry-After"] == "1"
    for ticket in tickets:
        ticket.__exit__(None, None, None)
    scheduler.close()


@pytest.mark.anyio
async def test_work_runs_off_the_event_loop_and_returns_its_value() -> None:
    scheduler = Scheduler(slots=1)
    loop_thread = threading.get_ident()
    measured = await scheduler.run(stand_in(threading.get_ident), timeout_s=5)
    assert measured.outputs["value"][0] != loop_thread
    scheduler.close()


@pytest.mark.anyio
async def test_a_request_waits_for_the_busy_slot_and_says_how_long() -> None:
    scheduler = Scheduler(slots=1)
    release = threading.Event()
    first = asyncio.create_task(scheduler.run(stand_in(lambda: release.wait(5)), timeout_s=30))
    await asyncio.sleep(0)  # the first takes the only slot and runs in its thread
    second = asyncio.create_task(scheduler.run(stand_in(lambda: "second"), timeout_s=30))
    await asyncio.sleep(0)  # the second waits for the slot
    waiting_since = time.perf_counter()
    await asyncio.sleep(0.05)
    held_s = time.perf_counter() - waiting_since
    release.set()
    first_done, second_done = await asyncio.gather(first, second)
    assert first_done.outputs["value"].tolist() == [True] and second_done.outputs["value"].tolist() == ["second"]
    # The second began waiting before `waiting_since` and got the slot only after `release.set()`: it waited at
    # least `held_s`, whatever the machine's speed (a slow one only makes it wait longer).
    assert second_done.timing.queue_s >= held_s
    scheduler.close()


@pytest.mark.anyio
async def test_a_timed_out_inference_keeps_its_slot_until_it_ends() -> None:
    scheduler = Scheduler(slots=1)
    release = threading.Event()
    with pytest.raises(InferenceTimeout, match="did not finish"):
        await scheduler.run(stand_in(release.wait), timeout_s=SHORT_TIMEOUT_S)
    with pytest.raises(InferenceTimeout, match="no inference slot"):
        await scheduler.run(stand_in(lambda: "second"), timeout_s=SHORT_TIMEOUT_S)
    release.set()
    assert (await scheduler.run(stand_in(lambda: "third"), timeout_s=5)).outputs["value"][0] == "third"
    scheduler.close()


# End to end: the test occupies the server's only inference slot through the server's own scheduler, on the
# server's event loop, so "busy" is a fact and not a race.


@pytest.fixture(scope="module")
def strict_server(model_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(model_dir=model_dir, inference_slots=1, max_queue=0, request_timeout_s=SHORT_TIMEOUT_S)
    with live_server(settings) as live:
        yield live


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
    registry = strict_server.service.metrics.registry
    assert (
        registry.get_sample_value(
            "ensemble_predictions_total", {"mode": "fused", "protocol": "http", "outcome": "timeout"}
        )
        == 1
    )
    with strict_server.client() as client:
        assert post_image(client).status_code == 200


def test_a_request_refused_under_overload_is_answered_while_still_uploading_and_never_parsed(
    strict_server: LiveServer, manifest: Manifest
) -> None:
    """The slot and the only ticket are taken: a request gets its 503 with Retry-After as its headers arrive, while
    its body is still on the way; the rest of its upload is dropped and the connection stays usable (never
    reset). Nothing of it is parsed, decoded or counted as a prediction; the early refusals count it."""
    registry = strict_server.service.metrics.registry
    early = registry.get_sample_value("ensemble_early_refusals_total") or 0
    predictions = registry.get_sample_value(
        "ensemble_predictions_total", {"mode": "fused", "protocol": "http", "outcome": "overloaded"}
    )
    body = b"--b\r\nContent-Disposition: form-data; name=file; filename=x.png\r\n\r\n" + png_bytes() + b"\r\n--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": str(len(body))}
    with holding_the_slot(strict_server, with_ticket=True):
        for path in ("/predict", f"/v2/models/{manifest.name}/infer"):
            with PartialRequest(strict_server.url, path, headers) as request:
                request.send(body[:100])
                answer = request.answer()  # before the rest of the body is sent
                assert answer.status == 503 and answer.headers["Retry-After"] == "1"
                error = answer.json()["error"]
                assert (error if path.startswith("/v2") else error["message"]).startswith("1 requests are already")
                request.send(body[100:])  # the upload ends; the server drops it
                request.send(f"GET /healthz HTTP/1.1\r\nHost: {strict_server.url[7:]}\r\n\r\n".encode())
                assert request.answer().status == 200  # the same connection, alive
    assert registry.get_sample_value("ensemble_early_refusals_total") == early + 2
    after = registry.get_sample_value(
        "ensemble_predictions_total", {"mode": "fused", "protocol": "http", "outcome": "overloaded"}
    )
    assert after == predictions


def test_a_client_waiting_for_100_continue_is_refused_without_uploading_anything(strict_server: LiveServer) -> None:
    headers = {"Content-Type": "image/png", "Content-Length": "100000", "Expect": "100-continue"}
    with (
        holding_the_slot(strict_server, with_ticket=True),
        PartialRequest(strict_server.url, "/predict", headers) as request,
    ):
        answer = request.answer()  # no byte of the body sent
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"
