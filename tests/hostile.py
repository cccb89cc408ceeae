"""The worst request of each kind a hostile client can send the service, alone and 16 at once, with ordinary
requests beside them throughout, and the server's peak resident memory per kind.

tests/test_docker.py runs it against the image under a real memory limit (`docker run --memory`); run by hand it
measures any running service, for instance the image before and after a change (as root, for /proc/PID):

    python -m tests.hostile --url http://127.0.0.1:8000 --pid "$(docker inspect -f '{{.State.Pid}}' CONTAINER)" \\
        --api-key KEY --model shapes-ensemble
"""

from __future__ import annotations

import argparse
import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

AT_ONCE = 16
TIMEOUT_S = 120
MIB = 2**20


@dataclass(frozen=True)
class Target:
    url: str
    api_key: str
    model: str
    image_size: int  # the model's input side
    max_rows: int = 64  # the service's MAX_BATCH_ROWS default
    max_pixels: int = 4_000_000  # its MAX_IMAGE_PIXELS default for a small model

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.api_key}"}

    def tensor_body(self, rows: int) -> bytes:
        """A v2 JSON request of `rows` images of zeros, every output as JSON: the costliest encoding."""
        elements = rows * 3 * self.image_size * self.image_size
        data = ",".join(["0.0"] * elements)
        shape = f"[{rows},3,{self.image_size},{self.image_size}]"
        return f'{{"inputs":[{{"name":"image","shape":{shape},"datatype":"FP32","data":[{data}]}}]}}'.encode()


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
    send: Callable[[httpx.Client], int]  # one request; its status (0 for a transport error)
    expected: frozenset[int]  # the statuses it may get, 503 (overload) always allowed


def kinds(target: Target) -> list[Kind]:
    batch = target.tensor_body(target.max_rows)
    too_many_rows = target.tensor_body(560)  # for 48x48 images, the 11.6 MB request that once took 2.5 GB
    side = int(target.max_pixels**0.5)
    largest_image = png(side, side - 1)  # just under MAX_IMAGE_PIXELS
    huge_image = png(6300, 6300)  # 170 KB: once 1.78 GB for four of them
    numbers = b"0," * (10 * MIB - 64)  # just under MAX_UPLOAD_BYTES (20 MiB) with the rest of the JSON
    big_json = b'{"inputs":[{"name":"image","shape":[1],"datatype":"FP32","data":[' + numbers + b"0]}]}"
    infer = f"/v2/models/{target.model}/infer"

    def post(path: str, body: bytes, content_type: str, key: str | None = None) -> Callable[[httpx.Client], int]:
        headers = target.headers(key) | {"Content-Type": content_type}
        return lambda client: client.post(path, content=body, headers=headers).status_code

    return [
        Kind("biggest batch (MAX_BATCH_ROWS rows, JSON in and out)", post(infer, batch, "application/json"),
             frozenset({200, 413})),
        Kind("560 rows of JSON (MAX_BATCH_ROWS is 64)", post(infer, too_many_rows, "application/json"),
             frozenset({413})),
        Kind("biggest image under the pixel limit", post("/predict", largest_image, "image/png"), frozenset({200})),
        Kind("6300x6300 image", post("/predict", huge_image, "image/png"), frozenset({413})),
        Kind("biggest JSON body (just under 20 MiB)", post(infer, big_json, "application/json"), frozenset({413})),
        Kind("wrong key with a 20 MB body", post(infer, big_json, "application/json", key="x" * 32),
             frozenset({401})),
        Kind("made-up methods", lambda client: client.request("FOO", "/predict").status_code, frozenset({405})),
        Kind("slow upload (a byte every 0.2 s)", lambda client: slow_upload(client, target), frozenset({0, 408})),
    ]  # fmt: skip


def slow_upload(client: httpx.Client, target: Target, seconds: float = 3.0) -> int:
    """Headers announcing 1 MB, then a byte every 0.2 s for `seconds`, then the connection closes: the server
    must hold only the connection and the bytes it got. 0: closed by the client, as intended."""
    host, _, port = str(client.base_url).removeprefix("http://").rstrip("/").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\nContent-Length: {MIB}\r\n"
        connection.sendall((head + f"Authorization: Bearer {target.api_key}\r\n\r\n").encode())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            connection.sendall(b"\0")
            time.sleep(0.2)
    return 0


@dataclass
class Ordinary:
    """Small /predict requests in a loop while the hostile ones run: every one must be answered, 200 or a fast
    503 with Retry-After, never a transport error."""

    target: Target
    statuses: Counter[int] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        image = png(64, 64)
        with httpx.Client(base_url=self.target.url, timeout=TIMEOUT_S) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/predict", content=image, headers=self.target.headers() | {
                        "Content-Type": "image/png"})  # fmt: skip
                    ok = response.status_code == 200 or "Retry-After" in response.headers
                    self.statuses[response.status_code if ok else -response.status_code] += 1
                except httpx.TransportError:
                    self.statuses[0] += 1
                time.sleep(0.05)


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


def storm(target: Target, pid: int) -> tuple[list[Outcome], Counter[int]]:
    """Every kind, alone then AT_ONCE at a time, ordinary requests throughout; each kind's outcome and peak RSS."""
    ordinary = Ordinary(target)
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


def unexpected(outcome: Outcome, kind: Kind) -> set[int]:
    return (set(outcome.alone) | set(outcome.at_once)) - kind.expected - {503}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server's process id, for its peak RSS")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", default="shapes-ensemble")
    parser.add_argument("--image-size", type=int, default=48)
    args = parser.parse_args()
    outcomes, ordinary = storm(Target(args.url, args.api_key, args.model, args.image_size), args.pid)
    for outcome in outcomes:
        print(f"{outcome.kind:55} peak RSS {outcome.peak_rss_bytes / MIB:7.0f} MiB  alone {dict(outcome.alone)}  "
              f"{AT_ONCE} at once {dict(outcome.at_once)}")  # fmt: skip
    print(f"ordinary requests meanwhile: {dict(ordinary)}")


if __name__ == "__main__":
    main()
