"""The Open Inference Protocol endpoints, through the real Triton HTTP client and as raw JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from model_build.shapes import held_out_set
from tests.support import INT8_ATOL, LiveServer, infer_json

TOLERANCE = 1e-4
OUTPUTS = ("class_probs", "mask_probs", "class_probs_members")


@pytest.fixture
def triton_client(server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def batch_of(manifest: Manifest, n: int = 2, seed: int = 0) -> np.ndarray:
    spec = manifest.image
    return np.random.default_rng(seed).normal(size=(n, 3, spec.height, spec.width)).astype(np.float32)


def infer(
    client: triton.InferenceServerClient, manifest: Manifest, batch: np.ndarray, **parameters: str
) -> triton.InferResult:
    image = triton.InferInput("image", list(batch.shape), "FP32")
    image.set_data_from_numpy(batch, binary_data=False)
    outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS]
    return client.infer(manifest.name, [image], outputs=outputs, parameters=parameters or None)


def test_health_and_metadata(triton_client: triton.InferenceServerClient, manifest: Manifest) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready(manifest.name)
    assert triton_client.get_server_metadata()["name"] == "onnx-ensemble-serving"
    metadata = triton_client.get_model_metadata(manifest.name)
    spec, labels = manifest.image, len(manifest.image.labels)
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, spec.height, spec.width]}]
    assert {output["name"]: output["shape"] for output in metadata["outputs"]} == {
        "class_probs": [-1, labels],
        "mask_probs": [-1, labels + 1, spec.height, spec.width],
        "class_probs_members": [-1, len(manifest.members), labels],
    }


def test_every_mode_gives_the_same_tensors(triton_client: triton.InferenceServerClient, manifest: Manifest) -> None:
    batch = manifest.image.normalise(held_out_set(manifest.image.height, 2).images)
    results = {mode: infer(triton_client, manifest, batch, mode=mode.value) for mode in Mode}
    spec, labels, members = manifest.image, len(manifest.image.labels), len(manifest.members)
    fused = results[Mode.FUSED]
    assert fused.as_numpy("class_probs").shape == (2, labels)
    assert fused.as_numpy("mask_probs").shape == (2, labels + 1, spec.height, spec.width)
    assert fused.as_numpy("class_probs_members").shape == (2, members, labels)
    for mode, result in results.items():
        assert result.get_response()["parameters"]["mode"] == mode
        atol = INT8_ATOL if mode is Mode.FUSED_INT8 else TOLERANCE
        for name in OUTPUTS:
            np.testing.assert_allclose(result.as_numpy(name), fused.as_numpy(name), atol=atol, err_msg=name)


def test_default_mode_and_request_id(triton_client: triton.InferenceServerClient, manifest: Manifest) -> None:
    image = triton.InferInput("image", [1, 3, manifest.image.height, manifest.image.width], "FP32")
    image.set_data_from_numpy(batch_of(manifest, n=1), binary_data=False)
    result = triton_client.infer(manifest.name, [image], request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["parameters"]["mode"] == "fused"
    assert {output["name"] for output in response["outputs"]} == set(OUTPUTS)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, m: c.get_model_metadata("unknown"), "unknown model 'unknown'"),
        (lambda c, m: infer(c, m, batch_of(m)[:, :, :4]), "must have shape"),
        (lambda c, m: infer(c, m, batch_of(m), mode="fastest"), "parameter mode must be one of"),
    ],
    ids=["unknown-model", "wrong-shape", "unknown-mode"],
)
def test_client_sees_protocol_errors(
    triton_client: triton.InferenceServerClient, manifest: Manifest, call: object, message: str
) -> None:
    with pytest.raises(InferenceServerException, match=message):
        call(triton_client, manifest)  # type: ignore[operator]


def test_binary_tensors_with_tritonclients_defaults_equal_json_in_every_mode(
    triton_client: triton.InferenceServerClient, client: httpx.Client, manifest: Manifest
) -> None:
    """tritonclient.http with its defaults sends binary inputs and asks for binary outputs."""
    batch = batch_of(manifest, n=2)
    for mode in Mode:
        image = triton.InferInput("image", list(batch.shape), "FP32")
        image.set_data_from_numpy(batch)  # binary_data=True by default
        binary = triton_client.infer(manifest.name, [image], parameters={"mode": mode.value})
        as_json = infer_json(client, manifest.name, batch, mode=mode.value)
        for name in manifest.signature.output_names:
            expected = np.asarray(as_json[name]["data"], np.float32).reshape(as_json[name]["shape"])
            np.testing.assert_array_equal(binary.as_numpy(name), expected, err_msg=f"{mode} {name}")
        requested = [triton.InferRequestedOutput("class_probs", binary_data=False)]
        mixed = triton_client.infer(manifest.name, [image], outputs=requested, parameters={"mode": mode.value})
        np.testing.assert_array_equal(mixed.as_numpy("class_probs"), binary.as_numpy("class_probs"))


@pytest.mark.parametrize(
    ("size", "extra", "message"),
    [(100, b"", "binary_data_size must be"), (None, b"\0" * 8, "binary bytes that no input claims")],
    ids=["wrong-size", "unclaimed-bytes"],
)
def test_binary_sizes_that_do_not_fit_are_400(
    client: httpx.Client, manifest: Manifest, size: int | None, extra: bytes, message: str
) -> None:
    batch = batch_of(manifest, n=1)
    declared = batch.nbytes if size is None else size
    header = json.dumps(
        {"inputs": [{"name": "image", "shape": list(batch.shape), "datatype": "FP32",
                     "parameters": {"binary_data_size": declared}}]}
    ).encode()  # fmt: skip
    response = client.post(
        f"/v2/models/{manifest.name}/infer",
        content=header + batch.tobytes() + extra,
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 400 and message in response.json()["error"]


def request(manifest: Manifest, **changes: object) -> dict[str, object]:
    tensor = {"name": "image", "shape": [1, 3, manifest.image.height, manifest.image.width], "datatype": "FP32"}
    tensor["data"] = batch_of(manifest, n=1).ravel().tolist()
    tensor |= changes
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    "changes",
    [
        {"datatype": "INT8"},
        {"name": "pixels"},
        {"shape": [0, 3, 32, 32]},
        {"data": [1.0, 2.0]},
        {"data": ["a"] * 3072},
        {"data": [float("nan")] * 3072},
        {"data": None},
    ],
    ids=["datatype", "name", "empty-batch", "too-few", "strings", "nan", "no-data"],
)
def test_malformed_requests_are_400_in_the_protocols_shape(
    client: httpx.Client, manifest: Manifest, changes: dict[str, object]
) -> None:
    body = json.dumps(request(manifest, **changes))  # Python's json writes NaN, as some clients do
    response = client.post(f"/v2/models/{manifest.name}/infer", content=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert isinstance(response.json()["error"], str)


def test_unknown_outputs_and_unparsable_json_are_400(client: httpx.Client, manifest: Manifest) -> None:
    body = request(manifest) | {"outputs": [{"name": "logits"}]}
    response = client.post(f"/v2/models/{manifest.name}/infer", json=body)
    assert response.status_code == 400
    assert "logits" in response.json()["error"]
    broken = client.post(
        f"/v2/models/{manifest.name}/infer", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert set(broken.json()) == {"error"}


def test_nested_data_is_accepted(client: httpx.Client, manifest: Manifest) -> None:
    batch = batch_of(manifest, n=1)
    response = client.post(f"/v2/models/{manifest.name}/infer", json=request(manifest, data=batch.tolist()))
    assert response.status_code == 200, response.text
