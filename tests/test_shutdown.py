"""SIGTERM on the real entry point (`python -m app`): readiness turns false at once, no new connection is
taken, the request in flight finishes, and the process exits 0 within its grace period; with two worker processes
too (the supervisor passes SIGTERM on, the idle worker exits, the busy one finishes its request)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from bench.service import free_port, png_bytes, service_process
from tests.support import PartialRequest, Scrape

GRACE_S = 10


def wait_for(condition: object, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail(f"{condition} did not hold within {timeout_s} s")


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def status_of(url: str) -> int | None:
    """A new connection's answer (None: refused or cut): with workers, whichever is still listening answers."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_and_exits_zero(model_dir: Path, tmp_path: Path, workers: int) -> None:
    ops_port = free_port()
    image = png_bytes()
    settings = {"metrics_port": ops_port, "shutdown_grace_s": GRACE_S, "workers": workers}
    with service_process(model_dir, tmp_path, **settings) as service:
        ops_url = f"http://127.0.0.1:{ops_port}"
        with service.client() as client:
            banner = client.get("/healthz").headers
        assert "server" not in banner  # no server name or version
        headers = {"Content-Type": "image/png", "Content-Length": str(len(image))}
        with PartialRequest(service.url, "/predict", headers) as in_flight:
            in_flight.send(image[:100])
            # The ops port's own requests are not counted: in flight means this upload.
            in_flight_now = "ensemble_http_requests_in_flight"
            wait_for(lambda: Scrape(httpx.get(f"{ops_url}/metrics").text).value(in_flight_now) == 1)
            service.process.terminate()
            wait_for(lambda: status_of(f"{ops_url}/readyz") == 503)  # the load balancer stops sending
            wait_for(lambda: refuses_connections(service.url))
            in_flight.send(image[100:])
            answer = in_flight.answer()
        assert answer.status == 200, answer.body
        assert set(answer.json()["labels"][0]) >= {"name", "probability", "present"}
        # It exits by itself (the timeout only stops a hang).
        assert service.process.wait(timeout=GRACE_S + 5) == 0, service.output()
    assert "Traceback" not in service.output()
