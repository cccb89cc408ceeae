"""Shared fixtures: real models built once per test session by the real build step (`test` preset), ensembles
of third-party graphs fused by the real `fuse` command, and real uvicorn servers serving them on loopback ports."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from app.core.model import runtime_options
from app.engine.runtime import EnsembleRuntime
from app.settings import Settings
from ensemble_contract.manifest import Manifest, load_manifest
from model_build.build import build
from model_build.config import PRESETS
from tests.onnx_members import member_failing_on_large_values
from tests.support import VISION_LABELS, LiveServer, fuse, live_server
from tests.third_party import export_tabular_members, export_vision_members, tabular_data

IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps its caches and examples in a temporary directory of this run, removed at its end (not in
    .hypothesis/ in the checkout): set before any test module is collected, since collecting one already scans."""
    home = Path(tempfile.mkdtemp(prefix="hypothesis-"))
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    set_hypothesis_home_dir(home)
    # The in-process servers run ONNX Runtime alone, as bench.service's SMALL_SERVER does for the others, unless the
    # run says otherwise: ENGINE=auto's choice is a timing, which would make a test's engine vary from run to run.
    os.environ.setdefault("ENGINE", "onnxruntime")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory (manifest, members, fused graph) of the tiny `test` preset."""
    out = tmp_path_factory.mktemp("models") / "test"
    build(PRESETS["test"], out)
    return out


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("vision")
    members = export_vision_members(work)
    (work / "labels.txt").write_text("\n".join(VISION_LABELS) + "\n")
    result = fuse(
        *members, "--out", work / "model", "--name", "vision", "--task", "classify", "--image-size", "64x64",
        "--labels", f"@{work / 'labels.txt'}", "--scores", "logits", "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return work / "model"


@pytest.fixture(scope="session")
def tabular_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("tabular")
    members = export_tabular_members(work)
    x, y = tabular_data()
    np.savez(work / "calibration.npz", X=x[:100])
    np.savez(work / "eval.npz", X=x[300:], label=y[300:])
    result = fuse(
        *members, "--out", work / "model", "--name", "tabular", "--weights", "1,2,1",
        "--calibration", work / "calibration.npz", "--eval", work / "eval.npz",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return work / "model"


@pytest.fixture(scope="session")
def fragile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two members that fail inside ONNX Runtime on an input holding a large value, fused by the real `fuse`."""
    work = tmp_path_factory.mktemp("fragile")
    members = [member_failing_on_large_values(work / f"fragile{i}.onnx", seed=i) for i in range(2)]
    result = fuse(*members, "--out", work / "models", "--labels", "a,b,c")
    assert result.returncode == 0, result.stderr
    return work / "models"


@pytest.fixture(scope="session")
def manifest(model_dir: Path) -> Manifest:
    return load_manifest(model_dir)


@pytest.fixture(scope="session")
def runtime(model_dir: Path) -> Iterator[EnsembleRuntime]:
    """The service's runtime on the test models, in this process (no HTTP)."""
    loaded = EnsembleRuntime.load(runtime_options(Settings(model_dir=model_dir)))
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
