"""What a gRPC call may hold, and for how long: the API key is checked before the message is read, a sender that
stalls is answered after BODY_TIMEOUT_S, calls past MAX_CONCURRENCY are refused at once, and a call that is gone
(its deadline passed) holds no queue place, memory or inference. Raw grpc calls, so that a test chooses what the
client sends and when; a unary call is a stream of one message on the wire."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.grpc import ACCESS
from app.settings import Settings
from bench.service import free_port
from ensemble_contract.manifest import Manifest
from tests.support import LiveServer, Scrape, holding_the_slot, live_server, scrape

API_KEY = "a-long-enough-grpc-test-key"
KEYED = (("authorization", f"Bearer {API_KEY}"),)
SERVICE = "/inference.GRPCInferenceService/"
MAX_CONCURRENCY = 3
# A deadline flood: threads, each sending calls one after another, every call ROWS rows with a DEADLINE_S deadline.
FLOOD_THREADS, CALLS_PER_THREAD, ROWS, DEADLINE_S = 4, 3, 64, 0.2
SAFETY_S = 60  # a client deadline no passing test reaches: a server that never answers fails the test, not hangs it


@pytest.fixture(scope="module")
def guarded(model_dir: Path) -> Iterator[tuple[LiveServer, str]]:
    """An API key and a model control key, a 1 s BODY_TIMEOUT_S, one inference slot and a queue that takes a whole
    flood."""
    port = free_port()
    settings = Settings(
        model_dir=model_dir,
        grpc_port=port,
        api_key=API_KEY,
        model_control_key="the-model-control-key-of-this-test",
        body_timeout_s=1,
        inference_slots=1,
        max_queue=FLOOD_THREADS * CALLS_PER_THREAD,
        max_queue_wait_ms=600_000,
    )
    with live_server(settings) as live:
        yield live, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def crowded(model_dir: Path) -> Iterator[tuple[LiveServer, str]]:
    port = free_port()
    with live_server(Settings(model_dir=model_dir, grpc_port=port, max_concurrency=MAX_CONCURRENCY)) as live:
        yield live, f"127.0.0.1:{port}"


def sent_when(gate: threading.Event, message: bytes | None = None) -> Iterator[bytes]:
    """A request stream that sends nothing until `gate` is set, then `message` (if any), and ends."""
    gate.wait(timeout=SAFETY_S)
    if message is not None:
        yield message


def counted(scraped: Scrape, method: str, code: str) -> float:
    return scraped.value("ensemble_grpc_requests_total", method=method, code=code)


def image_batch(manifest: Manifest, rows: int) -> np.ndarray:
    spec = manifest.image
    return np.random.default_rng(3).normal(size=(rows, 3, spec.height, spec.width)).astype(np.float32)


def infer_request(manifest: Manifest, rows: int) -> pb.ModelInferRequest:
    batch = image_batch(manifest, rows)
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(batch.shape))
    return pb.ModelInferRequest(model_name=manifest.name, inputs=[tensor], raw_input_contents=[batch.tobytes()])


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-of-length"], ids=["no-key", "wrong-key"])
@pytest.mark.parametrize("method", sorted(ACCESS))
def test_the_key_is_checked_before_the_message_is_read(
    guarded: tuple[LiveServer, str], method: str, authorization: str | None
) -> None:
    """The message never comes: a server that read it before checking the key would answer the body timeout."""
    live, address = guarded
    metadata = None if authorization is None else (("authorization", authorization),)
    never = threading.Event()
    with grpc.insecure_channel(address) as channel, live.client() as http:
        before = scrape(http)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                channel.stream_unary(SERVICE + method)(sent_when(never), timeout=SAFETY_S, metadata=metadata)
        finally:
            never.set()
        after = scrape(http)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert counted(after, method, "UNAUTHENTICATED") == counted(before, method, "UNAUTHENTICATED") + 1


@pytest.mark.parametrize(
    ("method", "metadata"), [("ServerLive", None), ("ModelInfer", KEYED)], ids=["keyless-method", "with-the-key"]
)
def test_a_stalled_sender_is_answered_after_the_body_timeout(
    guarded: tuple[LiveServer, str], method: str, metadata: tuple[tuple[str, str], ...] | None
) -> None:
    _, address = guarded
    never = threading.Event()
    with grpc.insecure_channel(address) as channel:
        try:
            with pytest.raises(grpc.RpcError) as ended:
                channel.stream_unary(SERVICE + method)(sent_when(never), timeout=SAFETY_S, metadata=metadata)
        finally:
            never.set()
    assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "BODY_TIMEOUT_S" in ended.value.details()  # the server's answer, not the client's own deadline


def test_calls_past_max_concurrency_are_refused_at_once(crowded: tuple[LiveServer, str]) -> None:
    """MAX_CONCURRENCY calls whose message has not come hold every place; the next call, on the same connection
    (whose calls the server takes in the order they were made), is refused without waiting; once they are
    answered, calls pass again."""
    live, address = crowded
    gate = threading.Event()
    request = pb.ServerLiveRequest().SerializeToString()
    with grpc.insecure_channel(address) as channel, live.client() as http:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=SAFETY_S).live  # connected: calls now leave in order
        before = scrape(http)
        live_call = channel.stream_unary(SERVICE + "ServerLive", response_deserializer=pb.ServerLiveResponse.FromString)
        stalled = [live_call.future(sent_when(gate, request), timeout=SAFETY_S) for _ in range(MAX_CONCURRENCY)]
        try:
            with pytest.raises(grpc.RpcError) as refused:
                stub.ServerLive(pb.ServerLiveRequest(), timeout=SAFETY_S)
        finally:
            gate.set()
        assert all(call.result().live for call in stalled)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=SAFETY_S).live
        after = scrape(http)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_CONCURRENCY" in refused.value.details()
    assert ("retry-after", "1") in refused.value.trailing_metadata()
    assert counted(after, "ServerLive", "RESOURCE_EXHAUSTED") == counted(before, "ServerLive", "RESOURCE_EXHAUSTED") + 1


def test_calls_past_their_deadline_leave_nothing_behind(guarded: tuple[LiveServer, str], manifest: Manifest) -> None:
    """A deadline flood while the one inference slot is busy: every call ends DEADLINE_EXCEEDED in the queue. Once
    they have all returned and the slot is free, nothing of them is left: no queue place, no memory reserved, and
    the slot does not run the rows nobody waits for any more; a new call is served."""
    live, address = guarded
    flood = infer_request(manifest, ROWS)

    def send(calls: int) -> list[grpc.StatusCode]:
        with grpc.insecure_channel(address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            codes = []
            for _ in range(calls):
                try:
                    stub.ModelInfer(flood, timeout=DEADLINE_S, metadata=KEYED)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
            return codes

    with live.client() as http:
        before = scrape(http)
        with holding_the_slot(live, with_ticket=False), ThreadPoolExecutor(FLOOD_THREADS) as threads:
            codes = [code for done in threads.map(send, [CALLS_PER_THREAD] * FLOOD_THREADS) for code in done]
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * FLOOD_THREADS * CALLS_PER_THREAD
        with triton.InferenceServerClient(address) as client:
            one = image_batch(manifest, 1)
            tensor = triton.InferInput("image", list(one.shape), "FP32")
            tensor.set_data_from_numpy(one)
            result = client.infer(manifest.name, [tensor], headers=dict(KEYED))
        assert result.as_numpy("class_probs").shape[0] == 1
        after = scrape(http)
    assert after.value("ensemble_inferences_admitted") == 0
    assert after.value("ensemble_memory_reserved_bytes") == 0
    # The rows run since `before`, less the holder's row and the last request's.
    flood_rows_run = after.total("ensemble_batch_rows_sum") - before.total("ensemble_batch_rows_sum") - 2
    assert flood_rows_run < ROWS * FLOOD_THREADS * CALLS_PER_THREAD
