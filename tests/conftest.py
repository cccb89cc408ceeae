"""Shared fixtures: real models built once per test session by the real build step (`test` preset), and real
uvicorn servers serving them on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.runtime import EnsembleRuntime
from app.settings import Settings
from ensemble_contract.manifest import Manifest, load_manifest
from model_build.build import build
from model_build.config import PRESETS
from tests.support import LiveServer, live_server


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory (manifest, members, fused graph) of the tiny `test` preset."""
    out = tmp_path_factory.mktemp("models") / "test"
    build(PRESETS["test"], out)
    return out


@pytest.fixture(scope="session")
def manifest(model_dir: Path) -> Manifest:
    return load_manifest(model_dir)


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Iterator[EnsembleRuntime]:
    """The service's runtime on the test models, in this process (no HTTP)."""
    loaded = EnsembleRuntime.load(Settings(model_dir=model_dir))
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[LiveServer]:
    """The shared server: one inference slot, one queue place, fused by default."""
    with live_server(Settings(model_dir=model_dir, max_queue=1)) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http
