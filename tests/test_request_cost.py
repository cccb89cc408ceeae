"""What one request may cost is bounded before the work: rows, memory (the body, parsed JSON, tensors, ONNX
Runtime's working memory, encoded outputs) against MAX_REQUEST_BYTES and the memory budget, image pixels; the API
key before the body; the same validation over JSON, binary tensors and gRPC; metric series that clients cannot
create; repository calls that are cheap to refuse. A real server for each, on the test models."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from app.core.cost import CostModel
from app.core.memory import REQUEST_BASE_BYTES, MemoryBudget
from app.engine.probe import working_bytes_per_element
from app.errors import Overloaded, PayloadTooLarge
from app.settings import Settings
from app.v2.decoding import DECODED_BYTES_PER_BODY_BYTE
from bench.service import free_port, png_bytes
from ensemble_contract.manifest import Manifest
from ensemble_contract.signature import Signature, TensorSpec
from tests.support import LiveServer, infer_body, live_server, png_header_only, scrape

API_KEY = "a-request-cost-test-key-of-32-chars"
ROWS = 4  # MAX_BATCH_ROWS of the bounded server
MIB = 2**20
REQUEST_BYTES = 16 * MIB  # its MAX_REQUEST_BYTES: 4 rows fit, a large JSON body does not


def image_batch(manifest: Manifest, rows: int) -> np.ndarray:
    spec = manifest.image
    return np.random.default_rng(rows).normal(size=(rows, 3, spec.height, spec.width)).astype(np.float32)


@pytest.fixture(scope="module")
def bounded(model_dir: Path) -> Iterator[tuple[LiveServer, str]]:
    """A server with few rows per request, a key, gRPC, and MAX_REQUEST_BYTES that a big JSON body exceeds."""
    port = free_port()
    settings = Settings(
        model_dir=model_dir, max_batch_rows=ROWS, api_key=API_KEY, grpc_port=port, max_request_bytes=REQUEST_BYTES
    )
    with live_server(settings) as live:
        yield live, f"127.0.0.1:{port}"


def wait_until_released(server: LiveServer) -> None:
    """Every lease given back: a request's is, just after its answer is sent."""
    deadline = time.monotonic() + 10
    while server.dataplane.memory.held_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.dataplane.memory.held_bytes == 0


def authorized(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {API_KEY}"})


# The cost model and the budget on their own.


SIGNATURE = Signature(
    inputs=(TensorSpec(name="x", datatype="FP32", shape=(-1, 3, 8, 8)),),
    outputs=(
        TensorSpec(name="scores", datatype="FP32", shape=(-1, 4)),
        TensorSpec(name="mask", datatype="FP32", shape=(-1, 2, 8, 8)),
        TensorSpec(name="open", datatype="INT64", shape=(-1, -1)),
    ),
)


def test_rows_are_the_batch_dimension_and_bounded() -> None:
    cost = CostModel(SIGNATURE, max_rows=8, working_bytes_per_element=10.0, elements_per_row=192)
    assert cost.rows({"x": [8, 3, 8, 8]}) == 8
    with pytest.raises(PayloadTooLarge, match=r"9 rows, more than MAX_BATCH_ROWS \(8\)"):
        cost.rows({"x": [9, 3, 8, 8]})


def test_a_requests_memory_is_known_from_its_header() -> None:
    cost = CostModel(SIGNATURE, max_rows=8, working_bytes_per_element=10.0, elements_per_row=192)
    binary = cost.request_bytes({"x": [2, 3, 8, 8]}, {"scores": True, "mask": True})
    inputs, working = 2 * 192 * 4 * 2, 2 * 192 * 10  # the inputs, and their copy in a batch
    outputs_binary = (2 * 4 + 2 * 128) * 4 * 4  # each element: the array, its bytes, the body, the transport's
    assert binary == inputs + working + outputs_binary
    as_json = cost.request_bytes({"x": [2, 3, 8, 8]}, {"scores": False, "mask": False})
    assert as_json - binary == (2 * 4 + 2 * 128) * (56 - 16)  # a JSON number costs 56 bytes, a binary float 16
    assert cost.output_bytes(2, {"open": True}) == 2 * 1 * 8 * 4  # open dimensions count 1 until measured
    assert cost.largest_working_bytes == 8 * 192 * 10


def test_the_budget_refuses_one_request_over_its_share_and_many_over_the_total() -> None:
    budget = MemoryBudget(total_bytes=100, per_request_bytes=60)
    first, second = budget.lease(), budget.lease()
    first.reserve(50, "a")
    with pytest.raises(PayloadTooLarge, match="MAX_REQUEST_BYTES"):
        second.reserve(61, "b")
    with pytest.raises(Overloaded, match="MEMORY_BUDGET_BYTES"):
        second.reserve(51, "b")
    second.reserve(50, "b")
    assert budget.held_bytes == 100
    first.release()
    second.release()
    assert budget.held_bytes == 0
    assert MemoryBudget(total_bytes=10, per_request_bytes=60).per_request_bytes == 10


# Rows, JSON size and outputs, over every protocol.


def test_more_rows_than_max_batch_rows_is_413_over_json_binary_and_grpc(
    bounded: tuple[LiveServer, str], manifest: Manifest
) -> None:
    server, grpc_address = bounded
    batch = image_batch(manifest, ROWS + 1)
    with authorized(server) as client:
        response = client.post(f"/v2/models/{manifest.name}/infer", json=infer_body(batch, ["class_probs"]))
        assert response.status_code == 413
        assert "MAX_BATCH_ROWS (4)" in response.json()["error"]
        assert client.post(f"/v2/models/{manifest.name}/infer", json=infer_body(batch[:ROWS])).status_code == 200
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton_http.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)  # binary tensor data
    with pytest.raises(InferenceServerException, match="MAX_BATCH_ROWS"):
        http.infer(manifest.name, [tensor], headers={"Authorization": f"Bearer {API_KEY}"})
    with triton_grpc.InferenceServerClient(grpc_address) as client:
        tensor = triton_grpc.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(manifest.name, [tensor], headers={"authorization": f"Bearer {API_KEY}"})
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "MAX_BATCH_ROWS" in refused.value.message()


def test_a_json_body_too_large_once_parsed_is_refused_before_it_is_parsed(
    bounded: tuple[LiveServer, str], manifest: Manifest
) -> None:
    """Not even valid JSON: had it been parsed, the answer would be a 400."""
    body = b"[" + b"," * (REQUEST_BYTES // DECODED_BYTES_PER_BODY_BYTE)
    with authorized(server := bounded[0]) as client:
        response = client.post(f"/v2/models/{manifest.name}/infer", content=body)
    assert response.status_code == 413, response.text
    assert "its JSON, decoded" in response.json()["error"] and "binary data" in response.json()["error"]
    wait_until_released(server)


def test_json_outputs_too_large_point_to_binary_ones(model_dir: Path, manifest: Manifest) -> None:
    """MAX_REQUEST_BYTES set between what 16 images cost with their masks as binary data and as JSON numbers: the
    JSON request is refused with 413 pointing to binary outputs, the binary one is served."""
    cost = CostModel(manifest.signature, 64, working_bytes_per_element(model_dir), 3 * manifest.image.height**2)
    shapes = {"image": [16, 3, manifest.image.height, manifest.image.width]}
    binary, as_json = (cost.request_bytes(shapes, {"mask_probs": binary}) for binary in (True, False))
    assert as_json - binary > MIB
    settings = Settings(model_dir=model_dir, max_request_bytes=(binary + as_json) // 2)
    with live_server(settings) as server:
        client = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        batch = image_batch(manifest, 16)
        tensor = triton_http.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)  # the inputs as binary data either way
        json_output = triton_http.InferRequestedOutput("mask_probs", binary_data=False)
        with pytest.raises(InferenceServerException, match="binary_data_output") as refused:
            client.infer(manifest.name, [tensor], outputs=[json_output])
        assert refused.value.status() == "413"
        binary_output = triton_http.InferRequestedOutput("mask_probs", binary_data=True)
        assert client.infer(manifest.name, [tensor], outputs=[binary_output]).as_numpy("mask_probs").shape[0] == 16


def test_a_full_memory_budget_is_503_with_retry_after_and_frees_up(model_dir: Path, manifest: Manifest) -> None:
    with live_server(Settings(model_dir=model_dir, memory_budget_bytes=64 * MIB)) as server, server.client() as client:
        held = server.dataplane.memory.lease()
        held.reserve(server.dataplane.memory.total_bytes - REQUEST_BASE_BYTES - 1000, "the test")
        try:
            refused = client.post(f"/v2/models/{manifest.name}/infer", json=infer_body(image_batch(manifest, 1)))
            assert refused.status_code == 503
            assert "MEMORY_BUDGET_BYTES" in refused.json()["error"] and int(refused.headers["Retry-After"]) >= 1
            upload = client.post("/predict", files={"file": ("a.png", png_bytes(), "image/png")})
            assert upload.status_code == 503 and upload.json()["error"]["code"] == "overloaded"
        finally:
            held.release()
        accepted = client.post(f"/v2/models/{manifest.name}/infer", json=infer_body(image_batch(manifest, 1)))
        assert accepted.status_code == 200
        wait_until_released(server)
        metrics = scrape(client)
        assert metrics.value("ensemble_memory_budget_bytes") == 64 * MIB
        stats = client.get("/stats").json()["memory"]
        assert stats["budget_bytes"] == 64 * MIB and stats["working_bytes_per_input_element"] >= 0


# Images sized to the model.


def test_the_default_pixel_limit_is_proportionate_to_the_model(server: LiveServer) -> None:
    """A 32x32 model: 4 megapixels at least (16 times its input would be far less)."""
    assert server.service.settings.max_image_pixels is None
    with server.client() as client:
        too_large = client.post("/predict", files={"file": ("big.png", png_header_only(2001, 2000), "image/png")})
        assert too_large.status_code == 413
        assert "MAX_IMAGE_PIXELS" in too_large.json()["error"]["message"]
        under = client.post("/predict", files={"file": ("ok.png", png_header_only(1999, 2000), "image/png")})
        assert under.status_code == 400  # past the limit's check: only its missing pixels are wrong


def test_the_pixel_limit_follows_a_larger_model() -> None:
    assert Settings().image_pixel_limit(1024, 1024) == 16 * 1024 * 1024
    assert Settings(max_image_pixels=10).image_pixel_limit(1024, 1024) == 10


# The same validation over every encoding.


def nan_batch(manifest: Manifest) -> np.ndarray:
    batch = image_batch(manifest, 1)
    batch[0, 0, 0, 0] = np.nan
    return batch


def test_non_finite_inputs_are_refused_over_json_binary_and_grpc(
    bounded: tuple[LiveServer, str], manifest: Manifest
) -> None:
    server, grpc_address = bounded
    batch = nan_batch(manifest)
    with authorized(server) as client:
        as_json = client.post(f"/v2/models/{manifest.name}/infer", content=json.dumps(infer_body(batch)))
    assert as_json.status_code == 400 and "must be finite" in as_json.json()["error"]
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton_http.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)
    with pytest.raises(InferenceServerException, match="must be finite") as binary:
        http.infer(manifest.name, [tensor], headers={"Authorization": f"Bearer {API_KEY}"})
    assert binary.value.status() == "400"
    with triton_grpc.InferenceServerClient(grpc_address) as client:
        tensor = triton_grpc.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        with pytest.raises(InferenceServerException, match="must be finite") as raw:
            client.infer(manifest.name, [tensor], headers={"authorization": f"Bearer {API_KEY}"})
    assert raw.value.status() == "StatusCode.INVALID_ARGUMENT"


# The API key before any work.


def test_a_wrong_key_is_refused_before_the_body_is_read(bounded: tuple[LiveServer, str], manifest: Manifest) -> None:
    """The client announces 20 MB and sends none of it: the 401 comes all the same."""
    host, port = bounded[0].url.removeprefix("http://").split(":")
    for path in ("/predict", f"/v2/models/{manifest.name}/infer"):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key-of-some-length\r\n"
            connection.sendall((head + "Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n").encode())
            answer = connection.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 401"), answer


def test_a_wrong_key_over_grpc_is_refused_before_the_message_is_deserialized(bounded: tuple[LiveServer, str]) -> None:
    """Bytes that are no protobuf at all: deserialized, they would fail otherwise than UNAUTHENTICATED."""
    with grpc.insecure_channel(bounded[1]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff" * 1000, metadata=(("authorization", "Bearer wrong"),), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


# Server state that clients cannot grow.


def test_made_up_methods_and_paths_create_no_metric_series(server: LiveServer) -> None:
    def made_up(i: int) -> None:
        client.request(f"FOO{i}", "/predict")
        client.get(f"/made-up/{i}")
        client.request(f"BAR{i}", f"/made-up/{i}")

    with server.client() as client:
        made_up(0)  # the series they count in ("other" method, the unmatched route) exist from here on
        scrape(client)
        before = scrape(client)
        for i in range(1, 50):
            made_up(i)
        after = scrape(client)
    assert set(after.samples) == set(before.samples)
    assert not [labels for _, labels in after.samples if ("method", "FOO1") in labels]


# The model repository: cheap to refuse.


def test_a_load_while_one_runs_is_409(model_dir: Path) -> None:
    settings = Settings(model_dir=model_dir, model_control="explicit")
    with live_server(settings) as server, server.client() as client:
        repository = server.service.repository
        started, release = threading.Event(), threading.Event()

        async def hold_the_load_lock() -> None:
            async with repository._lock:
                started.set()
                await asyncio.to_thread(release.wait)

        holding = asyncio.run_coroutine_threadsafe(hold_the_load_lock(), server.loop)
        assert started.wait(10)
        try:
            name = server.dataplane.model.manifest.name
            response = client.post(f"/v2/repository/models/{name}/load")
            assert response.status_code == 409 and "already running" in response.json()["error"]
        finally:
            release.set()
            holding.result(10)


def test_a_wrong_name_is_refused_before_any_file_is_verified(model_dir: Path, tmp_path: Path) -> None:
    """The served directory's files are corrupted: a load would fail on them, but the name is checked first."""
    copy = tmp_path / "models"
    copy.mkdir()
    shutil.copytree(model_dir, copy / "m")
    settings = Settings(model_dir=copy / "m", model_control="explicit")
    with live_server(settings) as server, server.client() as client:
        for member in (copy / "m" / "members").iterdir():
            member.write_bytes(b"corrupted")
        response = client.post("/v2/repository/models/another-name/load")
        assert response.status_code == 400
        assert "not 'another-name'" in response.json()["error"]
        assert "does not match its sha256" not in response.json()["error"]
