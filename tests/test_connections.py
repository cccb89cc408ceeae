"""Connections and requests in flight: idle or half-sent connections neither hold the places of requests
(MAX_CONCURRENCY counts requests, and answers beyond it in JSON) nor keep probes out (MAX_CONNECTIONS makes room
by closing the longest-waiting), and are closed after HEADER_TIMEOUT_S, on PORT and METRICS_PORT alike; a request
whose client leaves while it waits for an inference stops costing anything. Real servers on loopback: `python -m
app` for the connection limits (they live in its uvicorn.Config), the in-process one where a test holds the slot."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.errors import RETRY_AFTER_S
from app.settings import Settings
from bench.service import LOOPBACK, ServiceProcess, free_port, service_process
from ensemble_contract.manifest import Manifest
from tests.support import PartialRequest, Scrape, holding_the_slot, infer_body, live_server

HALF_A_REQUEST_LINE = b"GET /healthz HT"
IDLE_SOCKETS = 200
CONCURRENCY, CONNECTIONS = 4, 300  # the crowded server's MAX_CONCURRENCY and MAX_CONNECTIONS
WAIT_S = 30  # the bound of every wait for the server to do something


@dataclass
class Served:
    """`python -m app`, and the port of its operations server (METRICS_PORT)."""

    process: ServiceProcess
    ops_port: int
    parser: object  # HTTP_PARSER


@contextmanager
def serving(model_dir: Path, log_dir: Path, **settings: object) -> Iterator[Served]:
    ops_port = free_port()
    with service_process(model_dir, log_dir, METRICS_PORT=ops_port, **settings) as process:
        yield Served(process, ops_port, settings.get("HTTP_PARSER", Settings.model_fields["http_parser"].default))


@pytest.fixture(scope="module")
def crowded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Few requests in flight, room for a few hundred connections, and a header timeout that outlasts the tests."""
    log_dir = tmp_path_factory.mktemp("crowded")
    settings = {"MAX_CONCURRENCY": CONCURRENCY, "MAX_CONNECTIONS": CONNECTIONS, "HEADER_TIMEOUT_S": 600}
    with serving(model_dir, log_dir, **settings) as served:
        yield served


@pytest.fixture(scope="module", params=["httptools", "h11"])
def strict(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Served]:
    """A client gets one second to send a request's headers, and two for the rest of a body it was answered; with
    either HTTP parser, since each has its own bounded protocol (app.http.connections)."""
    settings = {"HEADER_TIMEOUT_S": 1, "BODY_TIMEOUT_S": 2, "HTTP_PARSER": request.param}
    with serving(model_dir, tmp_path_factory.mktemp("strict"), **settings) as served:
        yield served


def half_sent(port: int, count: int) -> list[socket.socket]:
    """`count` connections that each sent half a request line and nothing more."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((LOOPBACK, port), timeout=WAIT_S)
        sock.sendall(HALF_A_REQUEST_LINE)
        sockets.append(sock)
    return sockets


@contextmanager
def closing_all(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        for sock in sockets:
            stack.enter_context(sock)
        yield sockets


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (without an answer) within WAIT_S: the client reads the end of the
    stream, or a reset when the server closed it with bytes of the client's still unread (as the kernel does)."""
    sock.settimeout(WAIT_S)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def still_open(sock: socket.socket) -> bool:
    """Whether the connection is open with nothing to read: the server neither answered nor closed it."""
    sock.setblocking(False)
    try:
        sock.recv(1024)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(WAIT_S)
    return False


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.05)


def tensor_request(manifest: Manifest) -> dict[str, object]:
    assert manifest.image is not None
    return infer_body(np.zeros((1, 3, manifest.image.height, manifest.image.width), np.float32))


# Idle connections hold no place of a request, and never keep a probe out.


def test_idle_connections_leave_requests_and_probes_their_places(crowded: Served, manifest: Manifest) -> None:
    """Far more half-sent connections than MAX_CONCURRENCY: the probes and an inference are answered meanwhile."""
    with closing_all(half_sent(crowded.process.port, IDLE_SOCKETS)) as idle, crowded.process.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        inference = client.post(f"/v2/models/{manifest.name}/infer", json=tensor_request(manifest))
        assert inference.status_code == 200, inference.text
        assert all(still_open(sock) for sock in idle)  # they were there all along


def test_a_connection_beyond_max_connections_closes_the_longest_waiting(crowded: Served) -> None:
    with closing_all(half_sent(crowded.process.port, 2 * CONNECTIONS)) as idle:
        with crowded.process.client() as client:
            assert client.get("/healthz").status_code == 200
        oldest, newest = idle[: CONNECTIONS // 2], idle[-CONNECTIONS // 2 :]
        assert all(closed_by_server(sock) for sock in oldest)
        assert all(still_open(sock) for sock in newest)


# Requests in flight: MAX_CONCURRENCY, answered in JSON.


def test_requests_beyond_max_concurrency_get_a_json_503_with_retry_after(crowded: Served, manifest: Manifest) -> None:
    """MAX_CONCURRENCY uploads stall mid-request (headers sent, body not): the next request is refused in its
    route's error shape, the probes are not, and once the uploads are gone requests are served again."""
    path = f"/v2/models/{manifest.name}/infer"
    with crowded.process.client() as client:
        stalled = [PartialRequest(crowded.process.url, path, {"Content-Length": "100"}) for _ in range(CONCURRENCY)]
        try:
            wait_until(lambda: client.get("/v2").status_code == 503, "the stalled uploads take every place")
            tensor = client.post(path, json=tensor_request(manifest))
            upload = client.post("/predict", files={"file": ("a.png", b"not read", "image/png")})
            probes = [client.get(probe).status_code for probe in ("/healthz", "/readyz", "/v2/health/ready")]
        finally:
            for request in stalled:
                request.close()
        assert tensor.status_code == 503
        assert tensor.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert "MAX_CONCURRENCY" in tensor.json()["error"]  # the protocol's shape: {"error": "..."}
        assert upload.status_code == 503 and upload.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert upload.json()["error"]["code"] == "overloaded"
        assert probes == [200, 200, 200]
        wait_until(lambda: client.get("/v2").status_code == 200, "the stalled uploads' places are given back")
        assert client.post(path, json=tensor_request(manifest)).status_code == 200


# HEADER_TIMEOUT_S.


def test_a_half_sent_request_is_closed_after_the_header_timeout(strict: Served) -> None:
    """On the API's port and on the operations port, whether the client sent half a request line or nothing."""
    for port in (strict.process.port, strict.ops_port):
        with closing_all(half_sent(port, 1)) as half, socket.create_connection((LOOPBACK, port)) as silent:
            assert closed_by_server(half[0]), port
            assert closed_by_server(silent), port


def closed_while_trickling(sock: socket.socket, piece: bytes) -> bool:
    """Sends `piece` every 0.2 s until the server closes the connection (True) or WAIT_S have passed (False)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            sock.sendall(piece)
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_headers_that_trickle_in_are_cut_off(strict: Served) -> None:
    """A header line every 0.2 s: the connection is never idle, but its headers never end."""
    with socket.create_connection((LOOPBACK, strict.process.port), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert closed_while_trickling(sock, b"X-Slow: one line at a time\r\n")


def test_headers_past_16_kib_get_400(strict: Served) -> None:
    """Headers that keep coming past 16 KiB are answered 400 and their connection closed (h11 bounds them itself,
    the httptools protocol as h11 does), long before HEADER_TIMEOUT_S."""
    with socket.create_connection((LOOPBACK, strict.process.port), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ")
        for _ in range(16):  # the last KiB crosses the bound: nothing is left unread when the server closes
            sock.sendall(b"a" * 1024)
            time.sleep(0.01)
        assert json_error(sock) == (400, "bad_request")


def test_what_is_not_http_gets_a_json_400_and_a_made_up_method_a_405(strict: Served) -> None:
    """A request line that is not HTTP gets the service's JSON error from either parser; a made-up method gets 405
    from the app where the parser passes it on (h11), and 400 from llhttp (httptools), which knows only the
    registered methods."""
    with socket.create_connection((LOOPBACK, strict.process.port), timeout=WAIT_S) as sock:
        sock.sendall(b"this is not HTTP\r\n\r\n")
        assert json_error(sock) == (400, "bad_request")
    response = httpx.request("FOO", f"{strict.process.url}/predict", timeout=WAIT_S)
    assert response.status_code == (400 if strict.parser == "httptools" else 405)
    assert response.json()["error"]["code"] == ("bad_request" if strict.parser == "httptools" else "method_not_allowed")


def json_error(sock: socket.socket) -> tuple[int, str]:
    """The status and the error code of the answer the server sent before it closed the connection."""
    answer = b""
    while chunk := sock.recv(4096):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]["code"]


def test_the_rest_of_a_refused_body_gets_body_timeout(strict: Served) -> None:
    """A body over MAX_UPLOAD_BYTES is refused from its Content-Length, before it is read: the server reads and drops
    the rest (the client gets its answer rather than a reset), but not for ever."""
    too_large = Settings.model_fields["max_upload_bytes"].default + 1  # the server's MAX_UPLOAD_BYTES
    declared = {"Content-Type": "image/png", "Content-Length": str(too_large)}
    with PartialRequest(strict.process.url, "/predict", declared) as request:
        assert request.answer().status == 413
        assert closed_while_trickling(request.sock, b"x" * 100)


def test_a_kept_alive_connection_gets_the_header_timeout_after_its_answer(strict: Served) -> None:
    with socket.create_connection((LOOPBACK, strict.process.port), timeout=WAIT_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'"alive"}' not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        sock.sendall(HALF_A_REQUEST_LINE)  # stops uvicorn's keep-alive timer, not the header timeout
        assert closed_by_server(sock)


# A client that leaves stops costing.


def test_requests_whose_clients_leave_leave_the_queue(model_dir: Path, manifest: Manifest) -> None:
    """With the one inference slot held, requests queue behind it; their clients close their connections: their
    places in the queue and their memory are given back at once, and none of them is run once the slot is free."""
    settings = Settings(model_dir=model_dir, batching_max_rows=1, max_queue=16, max_queue_wait_ms=600_000)
    body = json.dumps(tensor_request(manifest)).encode()
    path = f"/v2/models/{manifest.name}/infer"
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    leaving = 8
    with live_server(settings) as server, server.client() as client:
        dataplane = server.dataplane
        runs_before = batch_runs(client)
        with holding_the_slot(server, with_ticket=False):
            queued = [PartialRequest(server.url, path, headers) for _ in range(leaving)]
            for request in queued:
                request.send(body)
            wait_until(lambda: dataplane.admission.admitted == leaving, "the requests are queued")
            for request in queued:
                request.close()
            wait_until(lambda: dataplane.admission.admitted == 0, "the requests that left are no longer admitted")
            wait_until(lambda: dataplane.scheduler.waiting == 0, "the queue is empty")
            wait_until(lambda: dataplane.memory.held_bytes == 0, "their memory is given back")
        assert client.post(path, json=tensor_request(manifest)).status_code == 200
        assert batch_runs(client) - runs_before == 2  # the holder's and that one: none of the requests that left ran


def batch_runs(client: httpx.Client) -> float:
    """Inference runs of requests so far (each run observes its batch's size once)."""
    return Scrape(client.get("/metrics").text).total("ensemble_batch_rows_count")
