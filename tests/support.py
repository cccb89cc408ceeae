"""Helpers of the tests: a real uvicorn server in a background thread, clients of every protocol, /metrics parsing."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.core.dataplane import DataPlane
from app.core.scheduler import Batchable, BatchingPolicy
from app.core.service import Service
from app.engine.runtime import Measured, Tensors
from app.engine.timing import Timing
from app.main import create_app
from app.settings import Settings
from bench.service import REPO, free_port, service_environment, v2_json_body
from ensemble_contract.datatypes import NUMPY, of_numpy
from ensemble_contract.manifest import Int8, load_manifest
from ensemble_contract.modes import Mode

START_TIMEOUT_S = 60
VISION_LABELS = [f"class-{i}" for i in range(10)]
T = TypeVar("T")


@dataclass
class LiveServer:
    """A uvicorn server running the app in a background thread, with its own event loop."""

    app: FastAPI
    url: str
    loop: asyncio.AbstractEventLoop

    @property
    def service(self) -> Service:
        return self.app.state.service

    @property
    def dataplane(self) -> DataPlane:
        return self.service.serving()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the server's event loop (where its asyncio objects live) and waits for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=START_TIMEOUT_S)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


@contextmanager
def live_server(settings: Settings) -> Iterator[LiveServer]:
    app = create_app(settings, registry=CollectorRegistry())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(app, f"http://{host}:{port}", loop)
    finally:
        server.should_exit = True
        thread.join(timeout=START_TIMEOUT_S)
        loop.close()
        sock.close()


# How far fused-int8's probabilities may be from the fp32 modes' (which agree to 1e-4) on images like the tests'.
INT8_ATOL = 0.05


def run_to_exit(
    model_dir: Path, timeout_s: float = START_TIMEOUT_S, **settings: object
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m app` until it exits by itself (a start-up failure); its exit code and output."""
    environment = service_environment(model_dir, **({"PORT": free_port()} | settings))
    return subprocess.run(
        [sys.executable, "-m", "app"], env=environment, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def fuse(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Runs `python -m model_build fuse ARGS` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "model_build", "fuse", *map(str, args)], capture_output=True, text=True, timeout=300
    )


class Scrape:
    """One parsed /metrics page."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` that carry these labels (and any others)."""
        wanted = set(labels.items())
        return sum(value for (sample, have), value in self.samples.items() if sample == name and wanted <= have)

    def labels_of(self, name: str, label: str) -> set[str]:
        return {dict(have)[label] for sample, have in self.samples if sample == name and label in dict(have)}


def scrape(client: httpx.Client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200
    return Scrape(response.text)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG announcing width x height pixels with almost no data behind it: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def infer_body(
    batch: np.ndarray, outputs: list[str] | None = None, *, input_name: str = "image", **parameters: str
) -> dict[str, Any]:
    """A v2 JSON inference request for one batch of one input."""
    return v2_json_body({input_name: batch}, outputs, **parameters)


def infer_json(
    client: httpx.Client,
    model: str,
    batch: np.ndarray,
    outputs: list[str] | None = None,
    *,
    input_name: str = "image",
    **parameters: str,
) -> dict[str, dict[str, Any]]:
    """POSTs a v2 JSON inference request; the outputs by name."""
    response = client.post(
        f"/v2/models/{model}/infer", json=infer_body(batch, outputs, input_name=input_name, **parameters)
    )
    assert response.status_code == 200, response.text
    return {output["name"]: output for output in response.json()["outputs"]}


# Clients of every protocol, each a Call ready to send as often as asked, each answer decoded into arrays.

Outputs = dict[str, np.ndarray]


@dataclass
class ClientResult:
    """What a front answered, decoded: the outputs by name, and the rows of the inference the request ran in."""

    outputs: Outputs
    batch_rows: int


@dataclass
class Call:
    """One request, ready to send as many times as asked."""

    rows: int
    send: Callable[[], ClientResult]

    def __call__(self) -> ClientResult:
        return self.send()


def _rows(feeds: Tensors) -> int:
    return len(next(iter(feeds.values())))


def grpc_infer(
    client: triton_grpc.InferenceServerClient,
    model: str,
    batch: np.ndarray,
    *,
    name: str = "image",
    datatype: str = "FP32",
    headers: dict[str, str] | None = None,
    **parameters: str,
) -> triton_grpc.InferResult:
    """One input over gRPC as tritonclient sends it (raw_input_contents: the client's default), with `headers` as
    the call's metadata."""
    tensor = triton_grpc.InferInput(name, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return client.infer(model, [tensor], parameters=parameters or None, headers=headers)


def v2_json_call(url: str, model: str, feeds: Tensors, mode: Mode, outputs: list[str] | None = None) -> Call:
    body = v2_json_body(feeds, outputs, mode=mode.value)

    def call() -> ClientResult:
        response = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        arrays = {o["name"]: np.asarray(o["data"], NUMPY[o["datatype"]]).reshape(o["shape"]) for o in answer["outputs"]}
        return ClientResult(arrays, answer["parameters"]["batch_rows"])

    return Call(_rows(feeds), call)


def v2_binary_call(url: str, model: str, feeds: Tensors, mode: Mode) -> Call:
    """The binary tensor data extension both ways: raw inputs after the JSON header, outputs asked as binary."""
    inputs = [
        {"name": n, "shape": list(a.shape), "datatype": of_numpy(a.dtype), "parameters": {"binary_data_size": a.nbytes}}
        for n, a in feeds.items()
    ]
    header = {"inputs": inputs, "parameters": {"mode": mode.value, "binary_data_output": True}}
    head = json.dumps(header).encode()
    body = head + b"".join(np.ascontiguousarray(a).tobytes() for a in feeds.values())

    def call() -> ClientResult:
        response = httpx.post(
            f"{url}/v2/models/{model}/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        length = int(response.headers["Inference-Header-Content-Length"])
        answer, offset, arrays = json.loads(response.content[:length]), length, {}
        for o in answer["outputs"]:
            size = o["parameters"]["binary_data_size"]
            raw = response.content[offset : offset + size]
            arrays[o["name"]] = np.frombuffer(raw, NUMPY[o["datatype"]]).reshape(o["shape"])
            offset += size
        return ClientResult(arrays, answer["parameters"]["batch_rows"])

    return Call(_rows(feeds), call)


def grpc_call(address: str, model: str, feeds: Tensors, mode: Mode) -> Call:
    def call() -> ClientResult:
        with triton_grpc.InferenceServerClient(address) as client:
            inputs = []
            for name, array in feeds.items():
                tensor = triton_grpc.InferInput(name, list(array.shape), of_numpy(array.dtype))
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            result = client.infer(model, inputs, parameters={"mode": mode.value})
        response = result.get_response()
        arrays = {o.name: result.as_numpy(o.name) for o in response.outputs}
        return ClientResult(arrays, response.parameters["batch_rows"].int64_param)

    return Call(_rows(feeds), call)


def predict_call(url: str, png: bytes, mode: Mode) -> Call:
    """/predict with every member's probabilities: the answer's numbers as arrays."""

    def call() -> ClientResult:
        response = httpx.post(
            f"{url}/predict",
            params={"mode": mode.value, "members": "true"},
            content=png,
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        arrays = {"labels": np.asarray([label["probability"] for label in answer["labels"]], np.float64)}
        for member in answer["members"]:
            arrays[member["name"]] = np.asarray(list(member["probabilities"].values()), np.float64)
        timings = answer["timings_ms"]
        assert 0 <= timings["batch_wait"] <= timings["queue"]
        assert response.headers["Server-Timing"].endswith(f"batch_rows;desc={timings['batch_rows']}")
        return ClientResult(arrays, timings["batch_rows"])

    return Call(1, call)


def copy_without_int8(model_dir: Path, target: Path) -> Path:
    """A copy of a model directory as the build leaves it when the int8 graph loses too much accuracy."""
    copy = Path(shutil.copytree(model_dir, target))
    manifest = load_manifest(copy)
    assert manifest.int8.file is not None
    (copy / manifest.int8.file.path).unlink()
    manifest.model_copy(update={"int8": Int8(note="not kept")}).write(copy)
    return copy


def stand_in(work: Callable[[], object]) -> Batchable:
    """`work` as an inference that never merges with another: its value the output `value`, its duration the
    inference's."""

    def infer(feeds: Tensors) -> Measured:
        start = time.perf_counter()
        value = work()
        return Measured({"value": np.asarray([value])}, Timing(inference_s=time.perf_counter() - start, cpu_s=0.0))

    return Batchable(object(), "stand-in", 1, BatchingPolicy(max_rows=1), {}, infer)


@contextmanager
def holding_the_slot(server: LiveServer, *, with_ticket: bool) -> Iterator[None]:
    """Occupies the server's inference slot (with a ticket: its whole admission capacity) until the block ends."""
    running, release = threading.Event(), threading.Event()

    def work() -> None:
        running.set()
        release.wait()

    async def hold() -> None:
        dataplane = server.dataplane
        with dataplane.admission.ticket() if with_ticket else nullcontext():
            await dataplane.scheduler.run(stand_in(work), timeout_s=60)

    held = asyncio.run_coroutine_threadsafe(hold(), server.loop)
    assert running.wait(timeout=30)
    try:
        yield
    finally:
        release.set()
        held.result(timeout=30)


# A stalled uploader: a raw HTTP/1.1 client that can stop in the middle of a request body.


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class PartialRequest:
    """Sends the request line and headers, then the body only when told to."""

    def __init__(self, url: str, path: str, headers: dict[str, str], *, timeout_s: float = 30) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
        lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> Answer:
        response = http.client.HTTPResponse(self.sock, method="POST")
        response.begin()
        return Answer(response.status, response.headers, response.read())

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (a read returns end of file or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PartialRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
