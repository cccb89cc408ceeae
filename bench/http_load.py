"""HTTP for the benchmarks: servers started on free loopback ports (and stopped when done), Debian's `hey` as a
compiled client, the asyncio load loops, and a raw client that can stall in the middle of a request body.

Load loops: closed (N clients, each sends its next request when the last returns) and open (requests arrive at a
fixed mean rate, Poisson, whether or not earlier ones returned). Every loop stops at a request count or a time
limit, whichever comes first. Open-loop latency runs from each request's scheduled arrival, so a server that falls
behind is charged for the wait (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import http.client
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel

from bench.core import Summary
from ensemble_contract.datatypes import of_numpy
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode

LOOPBACK = "127.0.0.1"
REQUEST_TIMEOUT_S = 30.0
OPEN_LOOP_MAX_CONNECTIONS = 64

# Servers.


class ServerError(RuntimeError):
    """A server did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if the process has not exited `timeout_s` later."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def resident_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS), or None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class Server:
    url: str
    pid: int | None  # None: a server this bench did not start


def wait_ready(url: str, path: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"the server for {url} exited with {process.returncode} before it was ready")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerError(f"{url}{path} was not ready within {timeout_s:.0f} s")


@contextmanager
def started(
    args: Sequence[str],
    env: Mapping[str, str],
    port: int,
    log: Path,
    ready_path: str,
    timeout_s: float = 180,
    python: str = sys.executable,
    cores: set[int] | None = None,
) -> Iterator[Server]:
    """Runs `python ARGS` (`-m app`, `-m bench.peers naive`) with `env` added (on `cores` only, if given), waits
    for `ready_path`, and stops it afterwards."""
    url = f"http://{LOOPBACK}:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [python, *args],
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
        )
        try:
            wait_ready(url, ready_path, timeout_s, process)
            yield Server(url, process.pid)
        except ServerError as exc:
            raise ServerError(f"{exc}; its log: {log}") from None
        finally:
            stop(process, timeout_s=15)


# hey.


@dataclass(frozen=True)
class Reply:
    """One of hey's replies."""

    status: int
    seconds: float  # hey's response time
    offset_s: float  # when it was sent, from the start of the run


def hey_available() -> bool:
    return shutil.which("hey") is not None


def v2_bodies(manifest: Manifest, directory: Path) -> dict[Mode, Path]:
    """A v2 JSON inference request of one example input in each mode, written to DIRECTORY/<mode>.json for hey."""
    inputs = [
        {"name": k, "shape": list(v.shape), "datatype": of_numpy(v.dtype), "data": v.ravel().tolist()}
        for k, v in manifest.example_inputs().items()
    ]
    bodies = {mode: directory / f"{mode}.json" for mode in Mode}
    for mode, path in bodies.items():
        path.write_text(json.dumps({"inputs": inputs, "parameters": {"mode": mode.value}}))
    return bodies


def hey(
    url: str, body: Path, *, concurrency: int, requests: int | None = None, seconds: float | None = None
) -> list[Reply]:
    """Debian's `hey`, a compiled HTTP load generator (so the client's Python does not weigh on the server):
    POSTs `body` (JSON) to `url`: `requests` in all, or for `seconds`, from `concurrency` workers each sending
    its next request as soon as the last is answered (a closed loop). Every reply, refusals included."""
    amount = ["-n", str(requests)] if requests is not None else ["-z", f"{seconds}s"]
    command = ["hey", *amount, "-c", str(concurrency), "-m", "POST", "-T", "application/json", "-D", str(body)]
    timeout = 60 + (seconds or 0) * 2 + (requests or 0) * 0.5
    output = subprocess.run(
        [*command, "-o", "csv", url], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    return [
        Reply(int(row["status-code"]), float(row["response-time"]), float(row["offset"]))
        for row in csv.DictReader(io.StringIO(output))
        if row.get("status-code", "").isdigit()
    ]


# The asyncio load loops (httpx).


@dataclass(frozen=True)
class Payload:
    """One multipart upload (field `file`), encoded once and sent as is."""

    body: bytes
    content_type: str

    @classmethod
    def png(cls, data: bytes) -> Payload:
        request = httpx.Request("POST", "http://localhost/", files={"file": ("shapes.png", data, "image/png")})
        return cls(request.read(), request.headers["content-type"])

    @classmethod
    def gradient(cls, size: int) -> Payload:
        """A large grey gradient (size x size): decoding and resizing it dominate the server's work."""
        buffer = io.BytesIO()
        Image.linear_gradient("L").resize((size, size)).convert("RGB").save(buffer, format="PNG")
        return cls.png(buffer.getvalue())


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no response (connection error or client timeout)
    seconds: float
    mode: str | None
    server_ms: dict[str, float]  # the response's Server-Timing (the service's own split of its time)
    retry_after: str | None = None
    error: str | None = None  # why there is no response: the client's exception


class LoadResult(BaseModel):
    target: str
    mode: str
    pattern: str  # closed | open
    concurrency: int | None = None
    rate_rps: float | None = None
    sent: int
    ok: int
    error_rate: float
    statuses: dict[str, int]
    transport_errors: dict[str, int] = {}  # status 0 above, by the client's exception
    duration_s: float
    throughput_rps: float
    latency: Summary | None
    refused: Summary | None = None  # the 503s' latency: how fast overload is turned away
    refused_without_retry_after: int = 0
    retry_after: dict[str, int] = {}  # the 503s' Retry-After values, each with its count
    by_mode: dict[str, Summary]  # by the mode each response reports (splits `compare`)
    server_timing_p50_ms: dict[str, float]  # per Server-Timing metric: its median over the successful responses


def server_timing(header: str) -> dict[str, float]:
    """`a;dur=1.5, b;dur=0.2` -> {"a": 1.5, "b": 0.2}; metrics without a duration are left out."""
    timings = {}
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur" and name:
                with contextlib.suppress(ValueError):
                    timings[name] = float(value)
    return timings


async def _send(client: httpx.AsyncClient, url: str, payload: Payload, started: float, want_mode: bool) -> Outcome:
    try:
        response = await client.post(url, content=payload.body, headers={"content-type": payload.content_type})
    except httpx.HTTPError as exc:
        return Outcome(0, time.perf_counter() - started, None, {}, error=type(exc).__name__)
    seconds = time.perf_counter() - started
    mode = response.json().get("mode") if want_mode and response.status_code == 200 else None
    timings = server_timing(response.headers.get("server-timing", ""))
    return Outcome(response.status_code, seconds, mode, timings, response.headers.get("retry-after"))


def _result(target: str, mode: str, pattern: str, outcomes: list[Outcome], duration: float, **kw: object) -> LoadResult:
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    by_mode: dict[str, list[float]] = defaultdict(list)
    server: dict[str, list[float]] = defaultdict(list)
    for o in ok:
        if o.mode is not None:
            by_mode[o.mode].append(o.seconds)
        for name, ms in o.server_ms.items():
            server[name].append(ms)
    return LoadResult(
        target=target,
        mode=mode,
        pattern=pattern,
        sent=len(outcomes),
        ok=len(ok),
        error_rate=1 - len(ok) / len(outcomes) if outcomes else 0.0,
        statuses={str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())},
        transport_errors=dict(Counter(o.error for o in outcomes if o.error)),
        duration_s=duration,
        throughput_rps=len(ok) / duration if duration > 0 else 0.0,
        latency=Summary.of([o.seconds for o in ok]) if ok else None,
        refused=Summary.of([o.seconds for o in refused]) if refused else None,
        refused_without_retry_after=sum(o.retry_after is None for o in refused),
        retry_after=dict(Counter(o.retry_after for o in refused if o.retry_after is not None)),
        by_mode={m: Summary.of(s) for m, s in sorted(by_mode.items())},
        server_timing_p50_ms={name: float(np.median(ms)) for name, ms in server.items()},
        **kw,  # type: ignore[arg-type]
    )


def _predict_url(base: str, mode: str | None) -> str:
    return f"{base}/predict" + (f"?mode={mode}" if mode else "")


async def closed_loop(
    base: str, target: str, mode: str | None, payload: Payload, *, concurrency: int, requests: int, max_s: float
) -> LoadResult:
    url = _predict_url(base, mode)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    outcomes: list[Outcome] = []
    tickets = itertools.count()
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        deadline = start + max_s

        async def client_loop() -> None:
            while next(tickets) < requests and time.perf_counter() < deadline:
                outcomes.append(await _send(client, url, payload, time.perf_counter(), mode == "compare"))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return _result(target, mode or "default", "closed", outcomes, duration, concurrency=concurrency)


async def open_loop(
    base: str,
    target: str,
    mode: str | None,
    payload: Payload,
    *,
    rate: float,
    requests: int,
    max_s: float,
    seed: int = 0,
) -> LoadResult:
    url = _predict_url(base, mode)
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, requests))
    arrivals = arrivals[arrivals <= max_s]
    limits = httpx.Limits(max_connections=OPEN_LOOP_MAX_CONNECTIONS)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        start = time.perf_counter()
        tasks = []
        for offset in arrivals:
            scheduled = start + float(offset)
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(_send(client, url, payload, scheduled, mode == "compare")))
        outcomes = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return _result(target, mode or "default", "open", outcomes, duration, rate_rps=rate)


async def warm_up(base: str, mode: str | None, payload: Payload, requests: int) -> None:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(requests):
            await _send(client, _predict_url(base, mode), payload, time.perf_counter(), False)


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
