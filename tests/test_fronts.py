"""The two fronts answer the same questions the same way: the same request over REST (/v2) and over gRPC, side
by side on one server, gets the same outputs, the same readiness, the same metadata, and the same error, each in
its protocol's idiom (an HTTP status and the protocol's JSON; a gRPC status code and message)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from app.settings import Settings
from bench.service import free_port
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from tests.support import LiveServer, grpc_infer, infer_body, live_server

# The status each HTTP status is over gRPC (app.grpc.STATUS_CODES, read from the protocol's side here).
GRPC_OF_HTTP = {
    400: "StatusCode.INVALID_ARGUMENT",
    404: "StatusCode.NOT_FOUND",
    413: "StatusCode.RESOURCE_EXHAUSTED",
    503: "StatusCode.UNAVAILABLE",
}


Fronts = tuple[LiveServer, triton_grpc.InferenceServerClient]


@pytest.fixture(scope="module")
def fronts(model_dir: Path) -> Iterator[Fronts]:
    port = free_port()
    settings = Settings(model_dir=model_dir, grpc_port=port, max_batch_rows=4)
    with live_server(settings) as server, triton_grpc.InferenceServerClient(f"127.0.0.1:{port}") as client:
        yield server, client


def images(manifest: Manifest, rows: int) -> np.ndarray:
    spec = manifest.image
    return np.random.default_rng(rows).normal(size=(rows, 3, spec.height, spec.width)).astype(np.float32)


@pytest.mark.parametrize("mode", list(Mode))
def test_the_same_request_gets_the_same_outputs(fronts: Fronts, manifest: Manifest, mode: Mode) -> None:
    server, client = fronts
    batch = images(manifest, 2)
    with server.client() as http:
        response = http.post(f"/v2/models/{manifest.name}/infer", json=infer_body(batch, mode=mode.value))
    assert response.status_code == 200, response.text
    over_grpc = grpc_infer(client, manifest.name, batch, mode=mode.value)
    for output in response.json()["outputs"]:
        rest = np.asarray(output["data"], np.float32).reshape(output["shape"])
        np.testing.assert_array_equal(over_grpc.as_numpy(output["name"]), rest)
    assert response.json()["parameters"]["mode"] == over_grpc.get_response().parameters["mode"].string_param


def test_the_same_readiness_and_metadata(fronts: Fronts, manifest: Manifest) -> None:
    server, client = fronts
    with server.client() as http:
        assert (http.get("/v2/health/ready").json()["ready"], client.is_server_ready()) == (True, True)
        for name, ready in ((manifest.name, True), ("another-model", False)):
            assert (http.get(f"/v2/models/{name}/ready").status_code == 200) is ready
            assert client.is_model_ready(name) is ready
        rest = http.get(f"/v2/models/{manifest.name}").json()
    over_grpc = client.get_model_metadata(manifest.name, as_json=True)
    for side in ("inputs", "outputs"):
        grpc_side = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in over_grpc[side]]
        assert [(t["name"], t["datatype"], t["shape"]) for t in rest[side]] == grpc_side


def bad_requests(manifest: Manifest) -> list[tuple[str, str, np.ndarray, str, dict[str, str], int]]:
    """(case, model, batch, datatype, parameters, HTTP status) of requests both fronts must refuse alike."""
    ok = images(manifest, 1)
    return [
        ("unknown model", "another-model", ok, "FP32", {}, 404),
        ("wrong datatype", manifest.name, ok.astype(np.float64), "FP64", {}, 400),
        ("unknown mode", manifest.name, ok, "FP32", {"mode": "fastest"}, 400),
        ("not finite", manifest.name, np.full_like(ok, np.inf), "FP32", {}, 400),
        ("too many rows", manifest.name, images(manifest, 5), "FP32", {}, 413),
    ]


@pytest.mark.parametrize("case", range(5), ids=lambda i: ["unknown-model", "datatype", "mode", "finite", "rows"][i])
def test_the_same_bad_request_gets_the_same_error(fronts: Fronts, manifest: Manifest, case: int) -> None:
    server, client = fronts
    _, model, batch, datatype, parameters, status = bad_requests(manifest)[case]
    body = infer_body(batch, **parameters)
    body["inputs"][0]["datatype"] = datatype
    with server.client() as http:
        # Python's json writes inf as Infinity, which is not JSON: 1e39 is, and it is past FP32's range all the same
        response = http.post(f"/v2/models/{model}/infer", content=json.dumps(body).replace("Infinity", "1e39"))
    assert response.status_code == status, response.text
    with pytest.raises(InferenceServerException) as refused:
        grpc_infer(client, model, batch, datatype=datatype, **parameters)
    assert refused.value.status() == GRPC_OF_HTTP[status]
    assert refused.value.message() == response.json()["error"]


def test_an_unloaded_model_is_not_ready_on_either_front(model_dir: Path, manifest: Manifest) -> None:
    port = free_port()
    settings = Settings(model_dir=model_dir, grpc_port=port, model_control="explicit")
    with live_server(settings) as server, server.client() as http:
        assert http.post(f"/v2/repository/models/{manifest.name}/unload").status_code == 200
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{port}") as client:
            assert (http.get("/v2/health/ready").json()["ready"], client.is_server_ready()) == (False, False)
            assert http.get(f"/v2/models/{manifest.name}/ready").status_code == 503
            assert not client.is_model_ready(manifest.name)
            response = http.post(f"/v2/models/{manifest.name}/infer", json=infer_body(images(manifest, 1)))
            assert response.status_code == 503
            with pytest.raises(InferenceServerException) as refused:
                grpc_infer(client, manifest.name, images(manifest, 1))
            assert refused.value.status() == GRPC_OF_HTTP[503]
            assert refused.value.message() == response.json()["error"]
