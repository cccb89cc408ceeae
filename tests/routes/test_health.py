"""Probes: alive always, ready only with loaded sessions; everything that needs the models says 503 before."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from app.main import create_app
from bench.service import png_bytes
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode


def test_alive_and_ready(client: httpx.Client, manifest: Manifest) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    answer = ready.json()
    sessions = answer.pop("sessions")  # 1 slot: its sessions already on every core
    assert sessions["alone"] is None and sessions["why"] == "the layout's sessions already run on every core"
    assert set(sessions["shared"]) == set(Mode) and sessions["shared"]["fused"].startswith("onnxruntime intra_op=")
    assert answer == {
        "status": "ready",
        "model": manifest.name,
        "sha256": manifest.ensemble.sha256,
        "modes": [mode.value for mode in Mode],  # the test build ships the int8 graph
        "images": True,
        "auto": None,  # DEFAULT_MODE is not auto
        "workers": [{"worker": 0, "pid": os.getpid(), "sha256": manifest.ensemble.sha256}],  # serving alone
    }


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def not_started() -> AsyncIterator[httpx.AsyncClient]:
    """The real app before its lifespan has run (httpx's ASGI transport does not run it): nothing is loaded."""
    app = create_app(registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client:
        yield client


@pytest.mark.anyio
async def test_before_the_models_are_loaded(not_started: httpx.AsyncClient) -> None:
    assert (await not_started.get("/healthz")).status_code == 200
    assert (await not_started.get("/v2/health/live")).status_code == 200
    for response in (
        await not_started.get("/readyz"),
        await not_started.post("/predict", content=png_bytes(), headers={"Content-Type": "image/png"}),
        await not_started.get("/stats"),
    ):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "not_ready"
    v2 = await not_started.get("/v2/health/ready")
    assert v2.status_code == 503
    assert v2.json() == {"error": "the models are not loaded yet"}
