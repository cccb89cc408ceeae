"""An exposed port: the optional API key, CORS only when configured, the operations port, and error bodies
that leak nothing of the internals."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.settings import Settings
from bench.service import free_port, png_bytes
from ensemble_contract.manifest import Manifest
from tests.support import LiveServer, infer_body, live_server

API_KEY = "a-test-key-of-at-least-16-characters"
ORIGIN = "https://dashboard.example"


@pytest.fixture(scope="module")
def locked(model_dir: Path) -> Iterator[LiveServer]:
    """A server that needs the API key, allows one browser origin, and serves /metrics on its own port."""
    settings = Settings(model_dir=model_dir, api_key=API_KEY, cors_origins=[ORIGIN], metrics_port=free_port())
    with live_server(settings) as live:
        yield live


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tensor_request(manifest: Manifest) -> dict[str, object]:
    return infer_body(np.zeros((1, 3, manifest.image.height, manifest.image.width), np.float32))


@pytest.mark.parametrize("headers", [{}, bearer("wrong-key-of-at-least-16-chars"), {"Authorization": "Basic eDp5"}])
def test_predictions_need_the_api_key(locked: LiveServer, manifest: Manifest, headers: dict[str, str]) -> None:
    with locked.client() as client:
        upload = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}, headers=headers)
        tensor = client.post(f"/v2/models/{manifest.name}/infer", json=tensor_request(manifest), headers=headers)
    assert upload.status_code == 401
    assert upload.headers["WWW-Authenticate"].startswith("Bearer")
    assert upload.json()["error"]["code"] == "unauthorized"
    assert tensor.status_code == 401
    assert "error" in tensor.json() and isinstance(tensor.json()["error"], str)  # the protocol's own shape


def test_the_right_key_is_served(locked: LiveServer, manifest: Manifest) -> None:
    with locked.client() as client:
        upload = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")}, headers=bearer(API_KEY))
        tensor = client.post(
            f"/v2/models/{manifest.name}/infer", json=tensor_request(manifest), headers=bearer(API_KEY)
        )
    assert upload.status_code == 200, upload.text
    assert tensor.status_code == 200, tensor.text


def test_probes_and_metadata_stay_open(locked: LiveServer, manifest: Manifest) -> None:
    with locked.client() as client:
        for path in ("/healthz", "/readyz", "/v2/health/ready", f"/v2/models/{manifest.name}", "/stats", "/"):
            assert client.get(path).status_code == 200, path


def test_metrics_move_to_the_operations_port(locked: LiveServer) -> None:
    port = locked.service.settings.metrics_port
    with locked.client() as client:
        assert client.get("/metrics").status_code == 404
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as ops:
        metrics = ops.get("/metrics")
        assert metrics.status_code == 200
        assert "ensemble_request_seconds_bucket" in metrics.text
        assert ops.get("/readyz").status_code == 200
        assert ops.post("/predict").status_code in (404, 405)  # no API there


def test_cors_answers_only_the_configured_origin(locked: LiveServer, server: LiveServer) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    with locked.client() as client:
        allowed = client.options("/predict", headers=preflight)
        other = client.options("/predict", headers=preflight | {"Origin": "https://evil.example"})
        simple = client.get("/stats", headers={"Origin": ORIGIN})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "access-control-allow-origin" not in other.headers
    assert simple.headers["Access-Control-Allow-Origin"] == ORIGIN
    with server.client() as client:  # CORS_ORIGINS unset: no CORS header at all
        assert "access-control-allow-origin" not in client.get("/stats", headers={"Origin": ORIGIN}).headers


INTERNALS = re.compile(r"Traceback|File \"|/site-packages/|\.py\b|onnxruntime|numpy|starlette|uvicorn", re.I)


@pytest.mark.parametrize(
    ("method", "path", "options"),
    [
        ("POST", "/predict", {"content": b"\x89PNG not really", "headers": {"Content-Type": "image/png"}}),
        ("POST", "/predict?mode=bogus", {"content": png_bytes(), "headers": {"Content-Type": "image/png"}}),
        ("POST", "/predict", {"content": b"{}", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/v2/models/{model}/infer", {"content": b"{not json"}),
        ("POST", "/v2/models/nope/infer", {"json": {"inputs": []}}),
        ("GET", "/../../etc/passwd", {}),
        ("DELETE", "/predict", {}),
    ],
)
def test_error_bodies_leak_no_internals(
    client: httpx.Client, manifest: Manifest, method: str, path: str, options: dict[str, object]
) -> None:
    response = client.request(method, path.format(model=manifest.name), **options)  # type: ignore[arg-type]
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == "application/json"
    assert not INTERNALS.search(response.text), response.text
