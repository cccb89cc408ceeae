"""Every hostile kind of request we know of, and ordinary clients to send beside them. The storm sends the worst
of each kind (`kinds`, with the statuses each must get) alone and 16 at once, ordinary requests throughout, and
reads the server's peak resident memory per kind (tests/test_docker.py runs it against the image under a memory
limit); `bench.soak` sends all of them. By hand, against any running service (as root, for /proc/PID):

    python -m bench.hostile --url http://127.0.0.1:8000 --pid "$(docker inspect -f '{{.State.Pid}}' CONTAINER)" \\
        --api-key KEY --model shapes-ensemble
"""

from __future__ import annotations

import argparse
import io
import json
import math
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

AT_ONCE = 16
TIMEOUT_S = 120
MIB = 2**20
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class AttackTarget:
    url: str
    api_key: str
    model: str
    image_size: int  # the model's input side
    max_rows: int = 64  # the service's MAX_BATCH_ROWS default
    max_pixels: int = 4_000_000  # its MAX_IMAGE_PIXELS default for a small model
    grpc_address: str | None = None  # host:port, for the gRPC kinds

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}

    def tensor_body(self, rows: int, data: str | None = None, outputs: str = "") -> bytes:
        """A v2 JSON request of `rows` images of zeros (or `data`), asking for `outputs` (none: every output as JSON,
        the costliest)."""
        data = data or "[" + ",".join(["0.0"] * (rows * 3 * self.image_size * self.image_size)) + "]"
        shape = f"[{rows},3,{self.image_size},{self.image_size}]"
        body = f'{{"inputs":[{{"name":"image","shape":{shape},"datatype":"FP32","data":{data}}}]'
        return (body + (f',"outputs":[{outputs}]' if outputs else "") + "}").encode()


def png(width: int, height: int) -> bytes:
    """A real PNG of a smooth gradient: it compresses to little and decodes to width x height x 3 bytes."""
    row = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.broadcast_to(row[np.newaxis, :, np.newaxis], (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


@dataclass
class Kind:
    name: str
    send: Callable[[httpx.Client], int]  # one request; its status (0: the answer not awaited or a transport error)
    expected: frozenset[int] = frozenset()  # the statuses it may get besides 503 (overload); empty: any but a 5xx


def kinds(target: AttackTarget) -> list[Kind]:
    """The worst request of each kind over HTTP, and what each must get."""
    batch = target.tensor_body(target.max_rows)
    too_many_rows = target.tensor_body(560)  # for 48x48 images, the 11.6 MB request that once took 2.5 GB
    side = int(target.max_pixels**0.5)
    largest_image = png(side, side - 1)  # just under MAX_IMAGE_PIXELS
    huge_image = png(6300, 6300)  # 170 KB: once 1.78 GB for four of them
    numbers = b"0," * (10 * MIB - 64)  # just under MAX_UPLOAD_BYTES (20 MiB) with the rest of the JSON
    big_json = b'{"inputs":[{"name":"image","shape":[1],"datatype":"FP32","data":[' + numbers + b"0]}]}"
    infer = f"/v2/models/{target.model}/infer"
    post = _poster(target)
    return [
        Kind("biggest batch (MAX_BATCH_ROWS rows, JSON in and out)", post(infer, batch), frozenset({200, 413})),
        Kind("560 rows of JSON (MAX_BATCH_ROWS is 64)", post(infer, too_many_rows), frozenset({413})),
        Kind("biggest image under the pixel limit", post("/predict", largest_image, "image/png"), frozenset({200})),
        Kind("6300x6300 image", post("/predict", huge_image, "image/png"), frozenset({413})),
        Kind("biggest JSON body (just under 20 MiB)", post(infer, big_json), frozenset({413})),
        Kind("wrong key with a 20 MB body", post(infer, big_json, key="x" * 32), frozenset({401})),
        Kind("made-up methods", lambda client: client.request("FOO", "/predict").status_code, frozenset({405})),
        Kind("slow upload (a byte every 0.2 s)", lambda client: slow_upload(client, target), frozenset({0, 408})),
    ]


def more_kinds(target: AttackTarget) -> list[Kind]:
    """Malformed JSON, lying headers, stalled connections and the gRPC front (gRPC codes as 1000 + code): what the
    service must survive, whatever it answers."""
    infer = f"/v2/models/{target.model}/infer"
    strings = target.tensor_body(1, json.dumps(["x" * 20000] + ["a"] * 20000))
    outputs = ",".join(['{"name":"class_probs"}'] * 200_000)
    nested = target.tensor_body(1, "[" * 300 + "0" + "]" * 300, outputs=outputs)
    huge_numbers = target.tensor_body(1, "[" + ",".join(["1" + "0" * 400] * 3072) + "]")
    binary_lie = target.tensor_body(1).replace(b'"data":', b'"parameters":{"binary_data_size":999999999},"data":')
    rows64 = np.zeros((64, 3, target.image_size, target.image_size), np.float32)
    message = pb.ModelInferRequest(
        model_name=target.model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(rows64.shape))],
        raw_input_contents=[rows64.tobytes()],
    ).SerializeToString()
    metadata = (("authorization", f"Bearer {target.api_key}"),)

    def grpc_call(request: bytes | Iterator[bytes], timeout_s: float) -> int:
        with grpc.insecure_channel(target.grpc_address or "") as channel:
            call = channel.unary_unary if isinstance(request, bytes) else channel.stream_unary
            try:
                call(GRPC_INFER)(request, timeout=timeout_s, metadata=metadata)
            except grpc.RpcError as error:
                return 1000 + error.code().value[0]
        return 1000

    def never_sent(hold_s: float) -> Iterator[bytes]:
        """A call's headers and, for hold_s, not its message: others must not wait behind it."""
        time.sleep(hold_s)
        yield from ()

    post = _poster(target)
    return [
        Kind("strings in JSON data", post(infer, strings)),
        Kind("nested JSON, 200k outputs", post(infer, nested)),
        Kind("10**400 in FP32 data", post(infer, huge_numbers)),
        Kind("lying binary_data_size", post(infer, binary_lie, headers={"Inference-Header-Content-Length": "40"})),
        Kind("gRPC 64 rows, 0.2 s deadline", lambda _: grpc_call(message, 0.2)),
        Kind("gRPC message never sent", lambda _: grpc_call(never_sent(3.0), 13.0)),
        Kind("half a request line, held 3 s", lambda client: held(client, b"POST /v2/mod", 3.0)),
    ]


def _poster(target: AttackTarget) -> Callable[..., Callable[[httpx.Client], int]]:
    def post(path: str, body: bytes, content_type: str = "application/json", key: str | None = None,
             headers: dict[str, str] | None = None) -> Callable[[httpx.Client], int]:  # fmt: skip
        sent = target.headers(key) | {"Content-Type": content_type} | (headers or {})
        return lambda client: client.post(path, content=body, headers=sent).status_code

    return post


def _connect(client: httpx.Client) -> socket.socket:
    return socket.create_connection((client.base_url.host, client.base_url.port or 80), timeout=10)


def held(client: httpx.Client, payload: bytes, hold_s: float) -> int:
    """Sends `payload` (a request cut short) and holds the connection; 0, the server's answer not awaited."""
    with _connect(client) as connection:
        connection.sendall(payload)
        time.sleep(hold_s)
    return 0


def slow_upload(client: httpx.Client, target: AttackTarget, seconds: float = 3.0) -> int:
    """Headers announcing 1 MB, then a byte every 0.2 s for `seconds`, then the client closes (0): the server must
    hold only the connection and the bytes it got."""
    with _connect(client) as connection:
        head = f"POST /predict HTTP/1.1\r\nHost: {client.base_url.host}\r\nContent-Type: image/png\r\n"
        connection.sendall((head + f"Content-Length: {MIB}\r\nAuthorization: Bearer {target.api_key}\r\n\r\n").encode())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            connection.sendall(b"\0")
            time.sleep(0.2)
    return 0


@dataclass
class Ordinary:
    """An ordinary client in a loop beside the hostile ones: every request must get 200 or a 503 with Retry-After.
    Statuses: those two; any other negated (-500); 0: a transport error."""

    target: AttackTarget
    send: Callable[[httpx.Client], httpx.Response]
    pause_s: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of the 200s, in seconds
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, until: float = math.inf) -> None:
        with httpx.Client(base_url=self.target.url, timeout=TIMEOUT_S, headers=self.target.headers()) as client:
            while not self.stop.is_set() and time.monotonic() < until:
                start = time.perf_counter()
                try:
                    response = self.send(client)
                except httpx.TransportError:
                    self.statuses[0] += 1
                else:
                    status = response.status_code
                    if status == 200:
                        self.latencies.append(time.perf_counter() - start)
                    ok = status == 200 or (status == 503 and "Retry-After" in response.headers)
                    self.statuses[status if ok else -status] += 1
                time.sleep(self.pause_s)


def predicting(target: AttackTarget) -> Ordinary:
    """Small /predict uploads, a pause between them."""
    image = png(64, 64)
    return Ordinary(target, lambda c: c.post("/predict", content=image, headers={"Content-Type": "image/png"}), 0.05)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident memory since it started or since reset_peak."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Outcome:
    kind: str
    alone: Counter[int]
    at_once: Counter[int]
    peak_rss_bytes: int


def storm(target: AttackTarget, pid: int) -> tuple[list[Outcome], Counter[int]]:
    """Every kind, alone then AT_ONCE at a time, ordinary requests throughout; each kind's outcome and peak RSS."""
    ordinary = predicting(target)
    beside = threading.Thread(target=ordinary.run)
    beside.start()
    outcomes = []
    try:
        with ThreadPoolExecutor(AT_ONCE) as pool:
            for kind in kinds(target):
                reset_peak(pid)

                def one(_: int, kind: Kind = kind) -> int:
                    with httpx.Client(base_url=target.url, timeout=TIMEOUT_S) as client:
                        try:
                            return kind.send(client)
                        except httpx.TransportError:
                            return 0

                alone = Counter([one(0)])
                at_once = Counter(pool.map(one, range(AT_ONCE)))
                outcomes.append(Outcome(kind.name, alone, at_once, peak_rss_bytes(pid)))
    finally:
        ordinary.stop.set()
        beside.join()
    return outcomes, ordinary.statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server's process id, for its peak RSS")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="shapes-ensemble")
    parser.add_argument("--image-size", type=int, default=48)
    args = parser.parse_args()
    outcomes, ordinary = storm(AttackTarget(args.url, args.api_key, args.model, args.image_size), args.pid)
    for outcome in outcomes:
        print(f"{outcome.kind:55} peak RSS {outcome.peak_rss_bytes / MIB:7.0f} MiB  alone {dict(outcome.alone)}  "
              f"{AT_ONCE} at once {dict(outcome.at_once)}")  # fmt: skip
    print(f"ordinary requests meanwhile: {dict(ordinary)}")


if __name__ == "__main__":
    main()
