"""The Open Inference Protocol over gRPC, through the real Triton gRPC client with its defaults (raw contents)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.settings import Settings
from bench.service import free_port
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import Mode
from tests.support import LiveServer, grpc_infer, holding_the_slot, infer_json, live_server, scrape
from tests.third_party import TABULAR_FEATURES

API_KEY = "a-long-enough-grpc-test-key"


@pytest.fixture(scope="module")
def grpc_server(model_dir: Path) -> Iterator[tuple[LiveServer, str]]:
    port = free_port()
    with live_server(Settings(model_dir=model_dir, grpc_port=port, inference_slots=1, max_queue=0)) as live:
        yield live, f"127.0.0.1:{port}"


@pytest.fixture
def grpc_client(grpc_server: tuple[LiveServer, str]) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(grpc_server[1])
    yield client
    client.close()


def image_batch(manifest: Manifest, n: int = 2) -> np.ndarray:
    spec = manifest.image
    return np.random.default_rng(1).normal(size=(n, 3, spec.height, spec.width)).astype(np.float32)


def test_health_and_metadata(grpc_client: triton.InferenceServerClient, manifest: Manifest) -> None:
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(manifest.name)
    assert not grpc_client.is_model_ready("unknown")
    server = grpc_client.get_server_metadata(as_json=True)
    assert server["name"] == "onnx-ensemble-serving"
    assert set(server["extensions"]) == {"binary_tensor_data", "model_repository"}
    metadata = grpc_client.get_model_metadata(manifest.name, as_json=True)
    assert metadata["platform"] == "onnxruntime_onnx"
    expected = {spec.name: [str(d) for d in spec.shape or []] for spec in manifest.signature.outputs}
    assert {o["name"]: o["shape"] for o in metadata["outputs"]} == expected
    assert [i["name"] for i in metadata["inputs"]] == [spec.name for spec in manifest.signature.inputs]


def test_every_mode_over_grpc_equals_the_json_path(
    grpc_server: tuple[LiveServer, str], grpc_client: triton.InferenceServerClient, manifest: Manifest
) -> None:
    live, _ = grpc_server
    batch = image_batch(manifest)
    with live.client() as client:
        for mode in Mode:
            result = grpc_infer(grpc_client, manifest.name, batch, mode=mode.value)
            assert result.get_response(as_json=True)["parameters"]["mode"]["string_param"] == mode.value
            as_json = infer_json(client, manifest.name, batch, mode=mode.value)
            for name in manifest.signature.output_names:
                expected = np.asarray(as_json[name]["data"], np.float32).reshape(as_json[name]["shape"])
                np.testing.assert_array_equal(result.as_numpy(name), expected, err_msg=f"{mode} {name}")


def test_any_signature_over_grpc_in_every_mode(tabular_dir: Path) -> None:
    """The tabular ensemble: FP32 features in, INT64 labels (a vote) and FP64/FP32 probabilities out."""
    manifest = load_manifest(tabular_dir)
    port = free_port()
    rows = np.random.default_rng(2).normal(size=(5, TABULAR_FEATURES)).astype(np.float32)
    with (
        live_server(Settings(model_dir=tabular_dir, grpc_port=port)) as live,
        live.client() as client,
        triton.InferenceServerClient(f"127.0.0.1:{port}") as grpc_client,
    ):
        modes = live.dataplane.model.runtime.modes
        for mode in modes:
            result = grpc_infer(grpc_client, manifest.name, rows, name="X", mode=mode.value)
            as_json = infer_json(client, manifest.name, rows, input_name="X", mode=mode.value)
            for spec in manifest.signature.outputs:
                expected = np.asarray(as_json[spec.name]["data"], spec.dtype).reshape(as_json[spec.name]["shape"])
                got = result.as_numpy(spec.name)
                assert got.dtype == spec.dtype
                np.testing.assert_array_equal(got, expected, err_msg=f"{mode} {spec.name}")


def test_typed_contents_are_accepted_too(grpc_server: tuple[LiveServer, str], manifest: Manifest) -> None:
    """Clients that send `contents` instead of raw bytes (the protocol allows either) get the same answer."""
    _, address = grpc_server
    batch = image_batch(manifest, n=1)
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = stub.ModelInfer(pb.ModelInferRequest(model_name=manifest.name, inputs=[tensor]))
        raw = stub.ModelInfer(
            pb.ModelInferRequest(
                model_name=manifest.name,
                inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(batch.shape))],
                raw_input_contents=[batch.tobytes()],
            )
        )
    assert [o.name for o in typed.outputs] == list(manifest.signature.output_names)
    assert list(typed.raw_output_contents) == list(raw.raw_output_contents)


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda c, m: c.get_model_metadata("unknown"), "StatusCode.NOT_FOUND", "unknown model 'unknown'"),
        (
            lambda c, m: grpc_infer(c, m.name, image_batch(m)[:, :, :4]),
            "INVALID_ARGUMENT",
            "must have shape",
        ),
        (
            lambda c, m: grpc_infer(c, m.name, image_batch(m).astype(np.float64), datatype="FP64"),
            "INVALID_ARGUMENT",
            "must be FP32",
        ),
        (lambda c, m: grpc_infer(c, m.name, image_batch(m), mode="x"), "INVALID_ARGUMENT", "mode must be"),
        (lambda c, m: grpc_infer(c, m.name, image_batch(m), name="pixels"), "INVALID_ARGUMENT", "expected inputs"),
    ],
    ids=["unknown-model", "wrong-shape", "wrong-type", "unknown-mode", "unknown-input"],
)
def test_errors_carry_a_status_code_and_a_message(
    grpc_client: triton.InferenceServerClient, manifest: Manifest, call: object, code: str, message: str
) -> None:
    with pytest.raises(InferenceServerException, match=message) as raised:
        call(grpc_client, manifest)  # type: ignore[operator]
    assert code in str(raised.value.status())


def test_a_full_queue_is_unavailable_with_a_clear_message(
    grpc_server: tuple[LiveServer, str], grpc_client: triton.InferenceServerClient, manifest: Manifest
) -> None:
    live, _ = grpc_server
    full = "requests are already being served or queued"
    with holding_the_slot(live, with_ticket=True), live.client() as client:
        assert scrape(client).value("ensemble_inferences_admitted") == 1
        with pytest.raises(InferenceServerException, match=full) as raised:
            grpc_infer(grpc_client, manifest.name, image_batch(manifest))
    assert "UNAVAILABLE" in str(raised.value.status())
    assert grpc_infer(grpc_client, manifest.name, image_batch(manifest)).as_numpy("class_probs") is not None


def test_grpc_requests_are_counted_by_mode_and_protocol(
    grpc_server: tuple[LiveServer, str], grpc_client: triton.InferenceServerClient, manifest: Manifest
) -> None:
    live, _ = grpc_server
    with live.client() as client:
        before = scrape(client)
        grpc_infer(grpc_client, manifest.name, image_batch(manifest), mode="parallel")
        after = scrape(client)
    for name, labels in (
        ("ensemble_predictions_total", {"mode": "parallel", "protocol": "grpc", "outcome": "ok"}),
        ("ensemble_request_seconds_count", {"mode": "parallel", "protocol": "grpc"}),
        ("ensemble_grpc_requests_total", {"method": "ModelInfer", "code": "OK"}),
    ):
        assert after.value(name, **labels) == before.value(name, **labels) + 1, name
    http = {"mode": "parallel", "protocol": "http", "outcome": "ok"}
    assert after.value("ensemble_predictions_total", **http) == before.value("ensemble_predictions_total", **http)


def test_the_api_key_is_read_from_the_authorization_metadata(model_dir: Path, manifest: Manifest) -> None:
    port = free_port()
    settings = Settings(model_dir=model_dir, grpc_port=port, api_key=API_KEY)
    with live_server(settings), triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
        batch = image_batch(manifest)
        assert client.is_server_ready()  # probes and metadata stay open
        for headers, message in (
            (None, "needs the API key"),
            ({"authorization": "Bearer wrong-key-of-length"}, "not valid"),
        ):
            tensor = triton.InferInput("image", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            with pytest.raises(InferenceServerException, match=message) as raised:
                client.infer(manifest.name, [tensor], headers=headers)
            assert "UNAUTHENTICATED" in str(raised.value.status())
        tensor = triton.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer(manifest.name, [tensor], headers={"authorization": f"Bearer {API_KEY}"})
        assert result.as_numpy("class_probs").shape[0] == 2
