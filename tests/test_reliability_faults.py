"""Faults: a broken model directory or configuration stops `python -m app` at start-up with one clear line and a
non-zero exit; an error inside ONNX Runtime during a request is a JSON 500 naming the request id, counted, and
the service goes on serving."""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from app.settings import Settings
from bench.service import free_port
from ensemble_contract.manifest import FileEntry, Manifest, load_manifest
from ensemble_contract.modes import Mode
from tests.onnx_members import FRAGILE_SIZE
from tests.support import LiveServer, infer_body, live_server, run_to_exit, scrape

# ---------------------------------------------------------------------------------------------------------------
# Start-up refuses a broken model directory


def missing_member(root: Path, manifest: Manifest) -> None:
    (root / manifest.members[0].file.path).unlink()


def truncated_fused_graph(root: Path, manifest: Manifest) -> None:
    path = root / manifest.ensemble.path
    path.write_bytes(path.read_bytes()[: manifest.ensemble.size_bytes // 2])


def checksum_mismatch(root: Path, manifest: Manifest) -> None:
    path = root / manifest.members[1].file.path
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def manifest_disagrees_with_the_files(root: Path, manifest: Manifest) -> None:
    """The manifest says class_probs has one more label than the graphs give."""
    outputs = tuple(
        o.model_copy(update={"shape": (*o.shape[:-1], o.shape[-1] + 1)}) if o.name == "class_probs" else o
        for o in manifest.signature.outputs
    )
    manifest.model_copy(update={"signature": manifest.signature.model_copy(update={"outputs": outputs})}).write(root)


def no_manifest(root: Path, manifest: Manifest) -> None:
    (root / "manifest.json").unlink()


def manifest_not_json(root: Path, manifest: Manifest) -> None:
    (root / "manifest.json").write_text('{"schema_version": 1, "name": ')


def unloadable_model_with_a_matching_checksum(root: Path, manifest: Manifest) -> None:
    fused = root / manifest.ensemble.path
    fused.write_bytes(b"this is not an ONNX model")
    manifest.model_copy(update={"ensemble": FileEntry.of(root, fused)}).write(root)


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (missing_member, r"model file \S+ is missing"),
        (truncated_fused_graph, r"ensemble\.onnx has \d+ bytes, the manifest says \d+"),
        (checksum_mismatch, r"does not match its sha256 in the manifest"),
        (
            manifest_disagrees_with_the_files,
            r"tensor 'class_probs' is FP32 .* the manifest says class_probs FP32 \[-1, 5\]",
        ),
        (no_manifest, r"no manifest\.json in \S+: build the models first"),
        (manifest_not_json, r"manifest\.json is not a valid manifest"),
        (unloadable_model_with_a_matching_checksum, r"ONNX Runtime cannot load \S+ensemble\.onnx"),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_a_broken_model_directory_stops_start_up_with_one_clear_line(
    model_dir: Path, manifest: Manifest, tmp_path: Path, breakage: Callable[[Path, Manifest], None], reason: str
) -> None:
    broken = Path(shutil.copytree(model_dir, tmp_path / "models"))
    breakage(broken, manifest)
    result = run_to_exit(broken)
    assert result.returncode == 3, result.stderr
    output = result.stdout + result.stderr
    [line] = [line for line in output.splitlines() if "cannot start:" in line]
    assert "model directory" in line or "ONNX Runtime" in line or "manifest" in line
    assert re.search(reason, line), line
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("settings", "shown", "hidden"),
    [
        ({"MAX_QUEUE": "-1"}, "MAX_QUEUE='-1': Input should be greater than or equal to 0", None),
        ({"API_KEY": "short-secret"}, "API_KEY=(hidden): Value error, a key must be at least 16", "short-secret"),
        ({"PORT": "8123", "METRICS_PORT": "8123"}, "PORT, METRICS_PORT and GRPC_PORT must all differ", None),
        ({"CORS_ORIGINS": "https://a.example/app"}, "'https://a.example/app' is not an origin", None),
    ],
    ids=["max-queue", "short-api-key", "same-ports", "cors-origin-with-a-path"],
)
def test_a_bad_setting_stops_start_up_naming_it(
    model_dir: Path, settings: dict[str, str], shown: str, hidden: str | None
) -> None:
    result = run_to_exit(model_dir, **settings)
    assert result.returncode == 2
    assert result.stderr.startswith("cannot start: invalid configuration: ")
    assert shown in result.stderr
    assert hidden is None or hidden not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_taken_metrics_port_stops_start_up(model_dir: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        result = run_to_exit(model_dir, METRICS_PORT=port)
    assert result.returncode == 3
    assert f"cannot start: cannot listen on METRICS_PORT {port}" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# An error inside ONNX Runtime during a request


@pytest.fixture(scope="module")
def fragile_server(fragile_dir: Path) -> Iterator[LiveServer]:
    with live_server(Settings(model_dir=fragile_dir, max_queue=4)) as live:
        yield live


def filled_body(value: float, **parameters: str) -> dict[str, object]:
    return infer_body(np.full((1, 3, FRAGILE_SIZE, FRAGILE_SIZE), value, np.float32), **parameters)


def assert_no_internals(text: str) -> None:
    for leak in ("Traceback", 'File "', "Gather", "onnxruntime", onnxruntime.__version__, "/", "\\", ".py", ".onnx"):
        assert leak not in text, f"{leak!r} leaks in {text!r}"


# `fuse` ships no int8 graph (it has no held-out set to check its accuracy on), so fused-int8 is not served here.
@pytest.mark.parametrize("mode", [Mode.FUSED, Mode.SEQUENTIAL, Mode.PARALLEL])
def test_an_onnx_runtime_error_is_a_json_500_with_the_request_id_and_is_counted(
    fragile_server: LiveServer, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    name = load_manifest(fragile_server.service.settings.model_dir).name
    with fragile_server.client() as client:
        before = scrape(client)
        failed = client.post(f"/v2/models/{name}/infer", json=filled_body(1000.0, mode=mode.value))
        after = scrape(client)
        served = client.post(f"/v2/models/{name}/infer", json=filled_body(0.5, mode=mode.value))
    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/json"
    request_id = failed.headers["X-Request-ID"]
    assert failed.json() == {"error": f"the {mode} inference failed; quote request id {request_id} when reporting it"}
    assert_no_internals(failed.json()["error"])
    assert after.value("ensemble_predictions_total", mode=mode, protocol="http", outcome="error") == (
        before.value("ensemble_predictions_total", mode=mode, protocol="http", outcome="error") + 1
    )
    route = "/v2/models/{model_name}/infer"
    assert after.value("ensemble_http_requests_total", route=route, method="POST", status="5xx") == (
        before.value("ensemble_http_requests_total", route=route, method="POST", status="5xx") + 1
    )
    # The cause is in the log, under the request id; the service goes on serving.
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)
    assert served.status_code == 200, served.text
    assert fragile_server.dataplane.admission.admitted == 0


def test_fragile_members_do_fail_inside_onnx_runtime(fragile_dir: Path) -> None:
    """The premise of the tests above: batch values that a picture never produces break the graph itself."""
    manifest = json.loads((fragile_dir / "manifest.json").read_text())
    session = onnxruntime.InferenceSession(fragile_dir / manifest["ensemble"]["path"])
    session.run(None, {"image": np.zeros((2, 3, FRAGILE_SIZE, FRAGILE_SIZE), np.float32)})
    with pytest.raises(Exception, match="Gather"):
        session.run(None, {"image": np.full((1, 3, FRAGILE_SIZE, FRAGILE_SIZE), 1000.0, np.float32)})
