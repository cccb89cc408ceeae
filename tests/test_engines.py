"""ENGINE: OpenVINO runs a mode only where its outputs equal ONNX Runtime's within the manifest's tolerance (and, with
ENGINE=auto, where it ran faster); every mode records its engine and why, which ensemble_model_info shows."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.core.model import runtime_options
from app.engine.engines import OpenVinoSession
from app.engine.runtime import EnsembleRuntime
from app.errors import StartupError
from app.observability.metrics import model_info
from app.settings import Engine, Settings
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode
from ensemble_contract.tolerance import disagreement


def load(model_dir: Path, **settings: object) -> EnsembleRuntime:
    return EnsembleRuntime.load(runtime_options(Settings(model_dir=model_dir, **settings)))


@pytest.fixture(scope="module")
def on_openvino(model_dir: Path) -> Iterator[EnsembleRuntime]:
    runtime = load(model_dir, engine=Engine.OPENVINO, inference_slots=2)
    yield runtime
    runtime.close()


def test_openvino_serves_onnxruntimes_outputs_in_every_mode_it_runs(
    on_openvino: EnsembleRuntime, runtime: EnsembleRuntime
) -> None:
    """Batches of several sizes (the batch dimension stays dynamic), from more callers at once than slots."""
    assert on_openvino.engines[Mode.FUSED].engine is Engine.OPENVINO
    assert isinstance(on_openvino.session_sets[0].graphs[Mode.FUSED], OpenVinoSession)
    manifest = runtime.manifest
    calls = [(mode, rows) for mode in runtime.modes for rows in (1, 3, 8)] * 2
    with ThreadPoolExecutor(4) as callers:
        served = list(callers.map(lambda call: on_openvino.infer(manifest.example_inputs(call[1]), call[0]), calls))
    for (mode, rows), outputs in zip(calls, served, strict=True):
        _, differs = disagreement(outputs, runtime.infer(manifest.example_inputs(rows), mode), manifest.tolerance)
        assert differs is None, (mode, rows, differs)


def test_a_mode_openvino_does_not_run_says_why(on_openvino: EnsembleRuntime) -> None:
    for choice in on_openvino.engines.values():
        expected = "ENGINE=openvino: outputs within" if choice.engine is Engine.OPENVINO else "openvino refused"
        assert choice.reason.startswith(expected)


def test_auto_records_an_engine_and_a_reason_for_every_mode(model_dir: Path) -> None:
    runtime = load(model_dir, engine=Engine.AUTO)
    try:
        assert set(runtime.engines) == set(runtime.modes)
        for mode, choice in runtime.engines.items():
            assert choice.reason, mode
            if choice.engine is Engine.OPENVINO:  # agreed, and was faster
                assert "of onnxruntime's time" in choice.reason and "outputs within" in choice.reason
            assert model_info(runtime)[f"{mode.replace('-', '_')}_engine"] == choice.engine
    finally:
        runtime.close()


def test_openvino_is_refused_where_its_outputs_differ_beyond_the_manifests_tolerance(
    model_dir: Path, tmp_path: Path
) -> None:
    """A manifest whose tolerance no two engines' float arithmetic meets: every mode stays on ONNX Runtime."""
    copy = Path(shutil.copytree(model_dir, tmp_path / "models"))
    load_manifest(copy).model_copy(update={"tolerance": 1e-30}).write(copy)
    runtime = load(copy, engine=Engine.OPENVINO)
    try:
        for mode, choice in runtime.engines.items():
            assert choice.engine is Engine.ONNXRUNTIME, mode
            assert "openvino refused" in choice.reason and "beyond the tolerance 1e-30" in choice.reason
    finally:
        runtime.close()


def test_without_openvino_auto_runs_onnxruntime_and_openvino_stops_the_start(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an import finds when the package is not installed
    runtime = load(model_dir, engine=Engine.AUTO)
    try:
        assert {choice.engine for choice in runtime.engines.values()} == {Engine.ONNXRUNTIME}
        assert all("openvino is not installed" in choice.reason for choice in runtime.engines.values())
    finally:
        runtime.close()
    with pytest.raises(
        StartupError, match=r"ENGINE=openvino: openvino is not installed \(pip install \.\[openvino\]\)"
    ):
        load(model_dir, engine=Engine.OPENVINO)
