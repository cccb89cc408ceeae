"""Slow and never-finishing request bodies: 408, not before BODY_TIMEOUT_S, the connection closed, and nothing of
the service held (no queue place, no inference slot) while the body trickles in or after it is given up.

How soon after BODY_TIMEOUT_S the 408 comes is a timing, which a busy machine moves: it is not asserted here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.settings import Settings
from bench.service import png_bytes
from ensemble_contract.manifest import Manifest
from tests.support import LiveServer, PartialRequest, live_server

BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def strict_server(model_dir: Path) -> Iterator[LiveServer]:
    """One inference slot and no queue: a stalled upload that held a place would lock everyone else out."""
    settings = Settings(model_dir=model_dir, inference_slots=1, max_queue=0, body_timeout_s=BODY_TIMEOUT_S)
    with live_server(settings) as live:
        yield live


def post_image(server: LiveServer) -> httpx.Response:
    with server.client() as client:
        return client.post("/predict", content=png_bytes(), headers={"Content-Type": "image/png"})


def assert_timed_out(request: PartialRequest, started: float, *, protocol: bool = False) -> None:
    answer = request.answer()
    elapsed = time.monotonic() - started
    assert answer.status == 408, answer.body
    assert elapsed >= BODY_TIMEOUT_S  # the deadline runs from the request's arrival, after `started`
    assert answer.headers["Connection"] == "close"
    message = answer.json()["error"] if protocol else answer.json()["error"]["message"]
    assert f"did not arrive within {BODY_TIMEOUT_S:g} s" in message
    if not protocol:
        assert answer.json()["error"]["code"] == "body_timeout"
    assert request.closed_by_server()


def stalled(server: LiveServer, path: str, content_type: str, declared: int | None, first: bytes) -> PartialRequest:
    headers = {"Content-Type": content_type}
    headers |= {"Content-Length": str(declared)} if declared is not None else {"Transfer-Encoding": "chunked"}
    request = PartialRequest(server.url, path, headers)
    if first:
        request.send(first if declared is not None else f"{len(first):x}\r\n".encode() + first + b"\r\n")
    return request


@pytest.mark.parametrize(
    ("declared", "first"),
    [(5000, b""), (5000, png_bytes()[:100]), (None, png_bytes()[:100])],
    ids=["headers-only", "part-of-the-body", "chunked-never-ending"],
)
def test_a_stalled_raw_upload_gets_408_and_frees_nothing_it_never_held(
    strict_server: LiveServer, declared: int | None, first: bytes
) -> None:
    started = time.monotonic()
    with stalled(strict_server, "/predict", "image/png", declared, first) as request:
        # While it stalls, the only inference slot and the whole (zero) queue are free for others.
        assert post_image(strict_server).status_code == 200
        assert_timed_out(request, started)
    assert strict_server.dataplane.admission.admitted == 0
    assert post_image(strict_server).status_code == 200


def test_a_stalled_multipart_upload_gets_408(strict_server: LiveServer) -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    first = head.encode() + png_bytes()[:50]
    started = time.monotonic()
    with stalled(strict_server, "/predict", f"multipart/form-data; boundary={boundary}", 10_000, first) as request:
        assert_timed_out(request, started)
    assert post_image(strict_server).status_code == 200


def test_a_stalled_tensor_upload_gets_408_in_the_protocols_shape(strict_server: LiveServer, manifest: Manifest) -> None:
    started = time.monotonic()
    path = f"/v2/models/{manifest.name}/infer"
    with stalled(strict_server, path, "application/json", 100_000, b'{"inputs": [{"name": "image", ') as request:
        assert_timed_out(request, started, protocol=True)


def test_a_slow_upload_that_ends_in_time_is_served(strict_server: LiveServer) -> None:
    data = png_bytes()
    pieces = np.array_split(np.frombuffer(data, np.uint8), 5)
    with stalled(strict_server, "/predict", "image/png", len(data), b"") as request:
        for piece in pieces:
            time.sleep(BODY_TIMEOUT_S / 10)
            request.send(piece.tobytes())
        answer = request.answer()
    assert answer.status == 200, answer.body
    assert len(answer.json()["labels"]) > 0


def test_timed_out_requests_are_counted_as_client_errors(strict_server: LiveServer) -> None:
    registry = strict_server.service.metrics.registry
    labels = {"route": "/predict", "method": "POST", "status": "4xx"}
    before = registry.get_sample_value("ensemble_http_requests_total", labels) or 0
    started = time.monotonic()
    with stalled(strict_server, "/predict", "image/png", 5000, b"\x89PNG") as request:
        assert_timed_out(request, started)
    assert registry.get_sample_value("ensemble_http_requests_total", labels) == before + 1
