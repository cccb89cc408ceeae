"""Attacking a running service: every hostile kind of request we know of, beside ordinary clients.

`storm --url URL --pid PID --api-key KEY` sends the worst request of each kind (`kinds`, with the statuses each must
get) alone, then 16 at once, small /predict uploads throughout, and reads PID's peak resident memory per kind (as root
for a container's; tests/test_docker.py runs it against the image). `soak [--build]` runs the image (built first from
this checkout with the test preset) under --memory, times HONEST v2 clients quiet, then while ATTACKERS threads cycle
through every kind and SIGHUP, and reports what it cost them, each figure with what it should be. Run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

from bench.service import REPO, encode, free_port, ready

AT_ONCE = 16
TIMEOUT_S = 120
MIB = 2**20
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
IMAGE = "onnx-ensemble-serving:soak"
SOAK_KEY = "a-soak-test-key-of-32-characters!"
SOAK_MODEL = "shapes-test"  # the test preset's model: 32x32 images
HONEST, ATTACKERS = 4, 16
QUIET_S = 20.0


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
    return encode(Image.fromarray(np.ascontiguousarray(pixels)), "PNG", compress_level=1)


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
    upload = (
        f"POST /predict HTTP/1.1\r\nHost: {httpx.URL(target.url).host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {MIB}\r\nAuthorization: Bearer {target.api_key}\r\n\r\n"
    ).encode()  # 1 MB announced
    post = _poster(target)
    return [
        Kind("biggest batch (MAX_BATCH_ROWS rows, JSON in and out)", post(infer, batch), frozenset({200, 413})),
        Kind("560 rows of JSON (MAX_BATCH_ROWS is 64)", post(infer, too_many_rows), frozenset({413})),
        Kind("biggest image under the pixel limit", post("/predict", largest_image, "image/png"), frozenset({200})),
        Kind("6300x6300 image", post("/predict", huge_image, "image/png"), frozenset({413})),
        Kind("biggest JSON body (just under 20 MiB)", post(infer, big_json), frozenset({413})),
        Kind("wrong key with a 20 MB body", post(infer, big_json, key="x" * 32), frozenset({401})),
        # 400 from llhttp (HTTP_PARSER=httptools, which knows only the registered methods), 405 from h11
        Kind("made-up methods", lambda client: client.request("FOO", "/predict").status_code, frozenset({400, 405})),
        Kind("slow upload (a byte every 0.2 s)", lambda client: held(client, upload, b"\0"), frozenset({0, 408})),
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
        Kind("half a request line, held 3 s", lambda client: held(client, b"POST /v2/mod")),
    ]


def _poster(target: AttackTarget) -> Callable[..., Callable[[httpx.Client], int]]:
    def post(path: str, body: bytes, content_type: str = "application/json", key: str | None = None,
             headers: dict[str, str] | None = None) -> Callable[[httpx.Client], int]:  # fmt: skip
        sent = target.headers(key) | {"Content-Type": content_type} | (headers or {})
        return lambda client: client.post(path, content=body, headers=sent).status_code

    return post


def held(client: httpx.Client, head: bytes, drip: bytes = b"", seconds: float = 3.0) -> int:
    """Sends `head` (a request cut short), then `drip` every 0.2 s for `seconds`, and closes; 0, no answer awaited:
    the server must hold only the connection and the bytes it got."""
    with socket.create_connection((client.base_url.host, client.base_url.port or 80), timeout=10) as connection:
        connection.sendall(head)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            connection.sendall(drip)
            time.sleep(0.2)
    return 0


def attack(every: Sequence[Kind], target: AttackTarget, threads: int, until: float = 0.0) -> dict[str, Counter[int]]:
    """`threads` attackers, each sending every kind in turn from its own start, once at least and until `until`;
    the statuses by kind (0 also for a transport error, its type then named with the kind)."""

    def attacker(start: int) -> list[tuple[str, int]]:
        sent = []
        with httpx.Client(base_url=target.url, timeout=TIMEOUT_S) as client:
            for turn in itertools.count(start):
                kind = every[turn % len(every)]
                try:
                    sent.append((kind.name, kind.send(client)))
                except (httpx.TransportError, OSError, subprocess.SubprocessError) as error:
                    sent.append((f"{kind.name} ({type(error).__name__})", 0))
                if time.monotonic() >= until:
                    break
        return sent

    statuses: dict[str, Counter[int]] = defaultdict(Counter)
    with ThreadPoolExecutor(threads) as pool:
        for name, status in itertools.chain.from_iterable(pool.map(attacker, range(threads))):
            statuses[name][status] += 1
    return statuses


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

    def run(self) -> None:
        with httpx.Client(base_url=self.target.url, timeout=TIMEOUT_S, headers=self.target.headers()) as client:
            while not self.stop.is_set():
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


@contextlib.contextmanager
def running(clients: list[Ordinary]) -> Iterator[list[Ordinary]]:
    """The clients in threads of their own while the block runs."""
    threads = [threading.Thread(target=client.run) for client in clients]
    for thread in threads:
        thread.start()
    try:
        yield clients
    finally:
        for client in clients:
            client.stop.set()
        for thread in threads:
            thread.join()


def predicting(target: AttackTarget) -> Ordinary:
    """Small /predict uploads, a pause between them."""
    image = png(64, 64)
    return Ordinary(target, lambda c: c.post("/predict", content=image, headers={"Content-Type": "image/png"}), 0.05)


def honest(target: AttackTarget) -> Ordinary:
    """1-row v2 requests asking for the scores."""
    body = target.tensor_body(1, outputs='{"name":"class_probs"}')
    return Ordinary(target, lambda client: client.post(f"/v2/models/{target.model}/infer", content=body))


@dataclass
class Outcome:
    kind: str
    alone: Counter[int]
    at_once: Counter[int]
    peak_rss_bytes: int  # VmHWM, reset before the kind


def storm(target: AttackTarget, pid: int) -> tuple[list[Outcome], Counter[int]]:
    """Every kind, alone then AT_ONCE at a time, ordinary requests throughout; each kind's outcome and peak RSS."""
    outcomes, status = [], Path(f"/proc/{pid}/status")
    with running([predicting(target)]) as [ordinary]:
        for kind in kinds(target):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM
            alone, at_once = (sum(attack([kind], target, n).values(), Counter()) for n in (1, AT_ONCE))
            peak = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
            outcomes.append(Outcome(kind.name, alone, at_once, int(peak.split()[1]) * 1024))
    return outcomes, ordinary.statuses


def docker(*args: str, timeout: float = 900) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def p99(clients: list[Ordinary]) -> float:
    latencies = sorted(x for c in clients for x in c.latencies)
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else float("nan")


def after_attack(target: AttackTarget, container: str, limit_s: float = 120.0) -> tuple[float, bool, float]:
    """How long a fresh honest request then takes to be answered 200 (NaN: not within limit_s), whether the
    container still runs, and the worker restarts it counted (NaN: /metrics did not answer)."""
    start, send, recovered_s = time.monotonic(), honest(target).send, float("nan")
    with httpx.Client(base_url=target.url, timeout=60, headers=target.headers()) as client:
        while math.isnan(recovered_s) and time.monotonic() - start < limit_s:
            with contextlib.suppress(httpx.TransportError):
                if send(client).status_code == 200:
                    recovered_s = time.monotonic() - start
        running_still = json.loads(docker("inspect", container))[0]["State"]["Running"]
        try:
            lines = client.get("/metrics").text.splitlines() if running_still else []
        except httpx.TransportError:
            lines = []
    counted = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("ensemble_worker_restarts_total")]
    return recovered_s, running_still, sum(counted) if lines else float("nan")


def soak(args: argparse.Namespace) -> None:
    if args.build:
        docker("build", "--build-arg", "MODEL_PRESET=test", "--tag", args.image, str(REPO), timeout=3600)
    port, grpc_port = free_port(), free_port()
    container = docker(
        "run", "--detach", "--rm", "--memory", args.memory, "--memory-swap", args.memory,
        "--env", f"WORKERS={args.workers}", "--env", f"API_KEY={SOAK_KEY}",
        "--publish", f"127.0.0.1:{port}:8000", "--publish", f"127.0.0.1:{grpc_port}:8081", args.image,
    ).strip()  # fmt: skip
    target = AttackTarget(f"http://127.0.0.1:{port}", SOAK_KEY, SOAK_MODEL, 32, grpc_address=f"127.0.0.1:{grpc_port}")
    sighup = Kind("SIGHUP to the container", lambda _: (docker("kill", "--signal", "HUP", container), 0)[1])
    peaks = [f"docker/{container}/memory.peak", f"system.slice/docker-{container}.scope/memory.peak",
             f"memory/docker/{container}/memory.max_usage_in_bytes"]  # cgroup v2 (cgroupfs, systemd), v1  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not ready(f"{target.url}/readyz"):
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become ready: " + docker("logs", container)[-2000:])
            time.sleep(0.5)
        with running([honest(target) for _ in range(HONEST)]) as quiet:
            time.sleep(QUIET_S)
        peak_file = next((p for p in (Path("/sys/fs/cgroup") / peak for peak in peaks) if p.exists()), None)
        with running([honest(target) for _ in range(HONEST)]) as attacked:
            every = [*kinds(target), *more_kinds(target), sighup]
            attackers = attack(every, target, ATTACKERS, until=time.monotonic() + args.seconds)
        recovered_s, running_still, restarted = after_attack(target, container)
    finally:
        subprocess.run(["docker", "rm", "--force", container], capture_output=True, check=False)
    failures = sum(n for c in attacked for status, n in c.statuses.items() if status <= 0)
    answered = sum(sum(c.statuses.values()) for c in attacked)
    peak = int(peak_file.read_text()) / MIB if peak_file else float("nan")
    print(f"soak: {args.image}, --memory {args.memory}, WORKERS={args.workers}, {ATTACKERS} attackers and {HONEST} "
          f"honest clients for {args.seconds:g} s (quiet run {QUIET_S:g} s)")  # fmt: skip
    print(f"container still running:     {running_still} (want True)")
    print(f"worker restarts:             {restarted:g} (want 0; nan: /metrics did not answer within 60 s)")
    print(f"first honest 200 after:      {recovered_s:.2f} s (want ~0)")
    print(f"honest failures:             {failures} of {answered} (want 0)")
    print(f"honest p99 attacked / quiet: {p99(attacked) * 1000:.1f} / {p99(quiet) * 1000:.1f} ms = "
          f"{p99(attacked) / p99(quiet):.2f}x (want <= 2)")  # fmt: skip
    print(f"peak memory:                 {peak:,.0f} MiB of {args.memory} (want under the limit; {peak_file})")
    print("honest statuses:", dict(sum((c.statuses for c in attacked), Counter())))
    bad = 0
    for name, statuses in sorted(attackers.items()):
        bad += sum(n for status, n in statuses.items() if 500 <= status < 600 and status != 503)
        print(f"  {name:34} {dict(statuses)}")
    print(f"attackers' 5xx other than 503: {bad} (want 0); 0: no answer awaited, gRPC codes shown as 1000 + code")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    each = commands.add_parser("storm", help="each kind alone and 16 at once: peak resident memory per kind")
    each.add_argument("--url", required=True)
    each.add_argument("--pid", type=int, required=True, help="the server's process id, for its peak RSS")
    each.add_argument("--api-key", required=True)
    each.add_argument("--model", default="shapes-ensemble")
    each.add_argument("--image-size", type=int, default=48)
    every = commands.add_parser("soak", help="the image in Docker under a memory limit, attacked beside honest clients")
    every.add_argument("--image", default=IMAGE)
    every.add_argument("--build", action="store_true", help="build the image from this checkout first")
    every.add_argument("--seconds", type=float, default=60.0)
    every.add_argument("--memory", default="2g")
    every.add_argument("--workers", default="2")
    args = parser.parse_args()
    if args.command == "soak":
        soak(args)
    else:
        outcomes, ordinary = storm(AttackTarget(args.url, args.api_key, args.model, args.image_size), args.pid)
        for outcome in outcomes:
            print(f"{outcome.kind:55} peak RSS {outcome.peak_rss_bytes / MIB:7.0f} MiB  alone {dict(outcome.alone)}  "
                  f"{AT_ONCE} at once {dict(outcome.at_once)}")  # fmt: skip
        print(f"ordinary requests meanwhile: {dict(ordinary)}")


if __name__ == "__main__":
    main()
