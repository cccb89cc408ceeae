"""Shared fixtures: real models built once per test session by the real build step (`test` preset)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.manifest import Manifest, load_manifest
from model_build.build import build
from model_build.config import PRESETS


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory (manifest, members, fused graph) of the tiny `test` preset."""
    out = tmp_path_factory.mktemp("models") / "test"
    build(PRESETS["test"], out)
    return out


@pytest.fixture(scope="session")
def manifest(model_dir: Path) -> Manifest:
    return load_manifest(model_dir)
