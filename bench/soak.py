"""`python -m bench.soak`: the service in Docker under a real memory limit, attacked for a minute by every hostile
kind of request we know of while honest clients keep asking, and what it cost them.

It runs the image (`--build` builds it first, from this checkout, with the test preset's tiny models) with
`--memory 2g`, WORKERS=2 and an API key on loopback ports; measures the honest clients' latency on a quiet service
(QUIET_S); then, for SECONDS, ATTACKERS threads send hostile requests (each cycling through HOSTILE_KINDS, from a
different start) while the HONEST clients go on. It reports what an operator would ask:

    worker restarts        want 0    (ensemble_worker_restarts_total; the container itself must still run)
    honest failures        want 0    (anything but 200, or 503 with Retry-After, counts)
    honest p99 / quiet p99 want <= 2
    peak memory            want under the limit (the container's cgroup memory.peak)
    attackers' statuses    each kind's, and any 5xx other than 503 is a failure too

Traffic goes to 127.0.0.1 only, bounded in time. Run as root (Docker, and the cgroup file for the peak).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image
from tritonclient.grpc import service_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
IMAGE = "onnx-ensemble-serving:soak"
API_KEY = "a-soak-test-key-of-32-characters!"
MODEL = "shapes-test"  # the test preset's model: 32x32 images
SIDE = 32
HONEST, ATTACKERS = 4, 16
QUIET_S = 20.0
MIB = 2**20
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
KEY = (("authorization", f"Bearer {API_KEY}"),)


def docker(*args: str, timeout: float = 900) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def json_infer(rows: int, data: str | None = None, outputs: str = "") -> bytes:
    """A v2 JSON request for `rows` images of zeros (or the given `data` text), asking for `outputs` (JSON)."""
    data = data or "[" + ",".join(["0.5"] * (rows * 3 * SIDE * SIDE)) + "]"
    shape = f"[{rows},3,{SIDE},{SIDE}]"
    body = f'{{"inputs":[{{"name":"image","shape":{shape},"datatype":"FP32","data":{data}}}]'
    return (body + (f',"outputs":[{outputs}]' if outputs else "") + "}").encode()


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Service:
    url: str
    grpc_address: str
    container: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}


def post(service: Service, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        return client.post(path, content=body, headers=service.headers | (headers or {})).status_code


def raw_socket(service: Service, payload: bytes, hold_s: float) -> int:
    """Sends `payload` (a request cut short) and holds the connection; 0, the server's answer not awaited."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(payload)
        time.sleep(hold_s)
    return 0


def grpc_call(service: Service, message: bytes, timeout_s: float, metadata: tuple = ()) -> int:
    with grpc.insecure_channel(service.grpc_address) as channel:
        try:
            channel.unary_unary(GRPC_INFER)(message, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            return 1000 + error.code().value[0]  # gRPC codes as 1000 + code, beside HTTP statuses
    return 1000


def grpc_stalled(service: Service, hold_s: float) -> int:
    """A call that sends its headers and, for hold_s, not its message: others must not wait behind it."""

    def nothing() -> Iterator[bytes]:
        time.sleep(hold_s)
        yield from ()

    with grpc.insecure_channel(service.grpc_address) as channel:
        try:
            channel.stream_unary(GRPC_INFER)(nothing(), timeout=hold_s + 10, metadata=KEY)
        except grpc.RpcError as error:
            return 1000 + error.code().value[0]
    return 1000


def hostile_kinds(service: Service) -> dict[str, Callable[[], int]]:
    infer = f"/v2/models/{MODEL}/infer"
    strings = json_infer(1, json.dumps(["x" * 20000] + ["a"] * 20000))
    nested = json_infer(1, "[" * 300 + "0" + "]" * 300, outputs=",".join(['{"name":"class_probs"}'] * 200_000))
    huge_numbers = json_infer(1, "[" + ",".join(["1" + "0" * 400] * 3072) + "]")
    big_json = json_infer(1, "[" + "0," * (10 * MIB - 100) + "0]")
    rows64 = np.zeros((64, 3, SIDE, SIDE), np.float32)
    grpc_message = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="FP32", shape=list(rows64.shape))],
        raw_input_contents=[rows64.tobytes()],
    ).SerializeToString()
    binary_lie = json_infer(1).replace(b'"data":', b'"parameters":{"binary_data_size":999999999},"data":')
    return {
        "strings in JSON data": lambda: post(service, infer, strings),
        "nested JSON, 200k outputs": lambda: post(service, infer, nested),
        "10**400 in FP32 data": lambda: post(service, infer, huge_numbers),
        "biggest JSON body": lambda: post(service, infer, big_json),
        "lying binary_data_size": lambda: post(service, infer, binary_lie, {"Inference-Header-Content-Length": "40"}),
        "wrong key, 20 MB body": lambda: post(service, infer, big_json, {"Authorization": "Bearer " + "x" * 32}),
        "6300x6300 image": lambda: post(service, "/predict", png(6300), {"Content-Type": "image/png"}),
        "gRPC 64 rows, 0.2 s deadline": lambda: grpc_call(service, grpc_message, 0.2, KEY),
        "gRPC message never sent": lambda: grpc_stalled(service, 3.0),
        "half a request line, held 3 s": lambda: raw_socket(service, b"POST /v2/mod", 3.0),
        "slow upload held 3 s": lambda: raw_socket(
            service, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc", 3.0
        ),
        "SIGHUP to the container": lambda: (docker("kill", "--signal", "HUP", service.container), 0)[1],
    }


@dataclass
class Honest:
    """A client sending ordinary 1-row v2 requests in a loop; latency of each success, status of each answer."""

    service: Service
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def run(self, until: float) -> None:
        body = json_infer(1, outputs='{"name":"class_probs"}')
        with httpx.Client(base_url=self.service.url, timeout=60, headers=self.service.headers) as client:
            while time.monotonic() < until:
                start = time.perf_counter()
                try:
                    response = client.post(f"/v2/models/{MODEL}/infer", content=body)
                except httpx.TransportError as error:
                    self.statuses[type(error).__name__] += 1
                    continue
                if response.status_code == 200:
                    self.latencies.append(time.perf_counter() - start)
                ok = response.status_code == 200 or (response.status_code == 503 and "Retry-After" in response.headers)
                self.statuses[str(response.status_code) if ok else f"failed {response.status_code}"] += 1


def run_honest(service: Service, seconds: float, beside: Callable[[float], None] | None = None) -> list[Honest]:
    until = time.monotonic() + seconds
    clients = [Honest(service) for _ in range(HONEST)]
    threads = [threading.Thread(target=c.run, args=(until,)) for c in clients]
    if beside is not None:
        threads.append(threading.Thread(target=beside, args=(until,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients


def attack(service: Service, until: float, statuses: dict[str, Counter[int]]) -> None:
    kinds = list(hostile_kinds(service).items())
    lock = threading.Lock()

    def attacker(index: int) -> None:
        turn = index
        while time.monotonic() < until:
            name, send = kinds[turn % len(kinds)]
            turn += 1
            try:
                status = send()
            except (httpx.TransportError, OSError, subprocess.SubprocessError) as error:
                status = -1
                name = f"{name} ({type(error).__name__})"
            with lock:
                statuses.setdefault(name, Counter())[status] += 1

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(ATTACKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def p99(clients: list[Honest]) -> float:
    latencies = sorted(x for c in clients for x in c.latencies)
    return statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else float("nan")


def peak_memory_file(container_id: str) -> Path | None:
    """The container's peak memory in its cgroup: v2's memory.peak (cgroupfs or systemd driver), or v1's."""
    candidates = [
        Path(f"/sys/fs/cgroup/docker/{container_id}/memory.peak"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.peak"),
        Path(f"/sys/fs/cgroup/memory/docker/{container_id}/memory.max_usage_in_bytes"),
    ]
    return next((path for path in candidates if path.exists()), None)


def recovery_s(service: Service, limit_s: float = 120.0) -> float:
    """How long after the attack a fresh honest request takes to be answered 200 (NaN: not within limit_s)."""
    start = time.monotonic()
    body = json_infer(1, outputs='{"name":"class_probs"}')
    while time.monotonic() - start < limit_s:
        try:
            if post(service, f"/v2/models/{MODEL}/infer", body) == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
    return float("nan")


def restarts(service: Service) -> float:
    try:
        text = httpx.get(f"{service.url}/metrics", timeout=60).text
    except httpx.TransportError:
        return float("nan")
    lines = [line for line in text.splitlines() if line.startswith("ensemble_worker_restarts_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--build", action="store_true", help="build the image from this checkout first")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--memory", default="2g")
    parser.add_argument("--workers", default="2")
    args = parser.parse_args()
    if args.build:
        docker("build", "--build-arg", "MODEL_PRESET=test", "--tag", args.image, str(REPO), timeout=3600)
    port, grpc_port = free_port(), free_port()
    container = docker(
        "run", "--detach", "--rm", "--memory", args.memory, "--memory-swap", args.memory,
        "--env", f"WORKERS={args.workers}", "--env", f"API_KEY={API_KEY}",
        "--publish", f"127.0.0.1:{port}:8000", "--publish", f"127.0.0.1:{grpc_port}:8081", args.image,
    ).strip()  # fmt: skip
    service = Service(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", container)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become ready: " + docker("logs", container)[-2000:])
            time.sleep(0.5)
        quiet = run_honest(service, QUIET_S)
        peak_file = peak_memory_file(container)
        attackers: dict[str, Counter[int]] = {}
        attacked = run_honest(service, args.seconds, beside=lambda until: attack(service, until, attackers))
        recovered_s = recovery_s(service)
        running = json.loads(docker("inspect", container))[0]["State"]["Running"]
        restarted = restarts(service) if running else float("nan")
        report(quiet, attacked, attackers, (restarted, recovered_s, running), peak_file, args)
    finally:
        subprocess.run(["docker", "rm", "--force", container], capture_output=True, check=False)


def report(
    quiet: list[Honest],
    attacked: list[Honest],
    attackers: dict[str, Counter[int]],
    after: tuple[float, float, bool],  # worker restarts, seconds until an honest request succeeds again, running
    peak_file: Path | None,
    args: argparse.Namespace,
) -> None:
    restarted, recovered_s, running = after
    failures = sum(n for c in attacked for status, n in c.statuses.items() if not status.isdigit())
    answered = sum(sum(c.statuses.values()) for c in attacked)
    peak = int(peak_file.read_text()) / MIB if peak_file else float("nan")
    print(f"soak: {args.image}, --memory {args.memory}, WORKERS={args.workers}, {ATTACKERS} attackers and {HONEST} "
          f"honest clients for {args.seconds:g} s (quiet run {QUIET_S:g} s)")  # fmt: skip
    print(f"container still running:     {running} (want True)")
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
    print(f"attackers' 5xx other than 503: {bad} (want 0); gRPC codes shown as 1000 + code")


if __name__ == "__main__":
    main()
