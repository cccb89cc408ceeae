"""The service as a client meets it, for the benchmarks and the tests alike: `python -m app` (or a peer) in a child
process on a free loopback port, the v2 JSON request body, and pictures to send."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from app.settings import Settings
from ensemble_contract.datatypes import of_numpy

START_TIMEOUT_S = 60
LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def v2_json_body(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None, **parameters: Any) -> dict:
    """A v2 JSON inference request: every input tensor as a JSON list, and the outputs asked for (all if None)."""
    tensors = [
        {"name": name, "shape": list(a.shape), "datatype": of_numpy(a.dtype), "data": a.ravel().tolist()}
        for name, a in inputs.items()
    ]
    body: dict[str, Any] = {"inputs": tensors, "parameters": parameters}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


def encode(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def picture(width: int = 48, height: int = 40, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random picture with some structure (a bright square on noise)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 250
    return Image.fromarray(pixels).convert(mode)


def png_bytes(seed: int = 0) -> bytes:
    return encode(picture(seed=seed), "PNG")


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


# What a server started here runs unless its caller says otherwise: one process (the tests' servers are small) on
# ONNX Runtime alone (ENGINE=auto's choice between engines is a timing, which would make a test's engine vary); the
# benchmarks of the service as users get it pass DEFAULTS.
SMALL_SERVER = {"WORKERS": "1", "ENGINE": "onnxruntime"}
DEFAULTS = {"WORKERS": "auto", "ENGINE": "auto"}  # the service's own defaults (app.settings), over SMALL_SERVER's


def service_environment(model_dir: Path, **settings: object) -> dict[str, str]:
    """This process's environment without any of the service's variables, then SMALL_SERVER's, then the caller's
    settings."""
    environment = {key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields}
    environment |= {"MODEL_DIR": str(model_dir), "HOST": LOOPBACK, "LOG_LEVEL": "warning", **SMALL_SERVER}
    return environment | {name.upper(): str(value) for name, value in settings.items()}


class ServerNotReady(RuntimeError):
    """A server exited, or did not answer its readiness path in time."""


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **options)  # type: ignore[arg-type]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def server_process(
    command: Sequence[str],
    port: int,
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/readyz",
    cores: set[int] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[ServiceProcess]:
    """`command` (an HTTP server listening on loopback `port`, its output to `log`) in a child process (on `cores`
    only, if given), ready (`ready_path` says 200) when yielded; stopped with SIGTERM (and killed if it does not
    stop) when the block ends."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            env=None if env is None else dict(env),
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
        )
    server = ServiceProcess(process, f"http://{LOOPBACK}:{port}", port, log)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready(server.url + ready_path):
            if process.poll() is not None:
                raise ServerNotReady(f"the server exited with {process.returncode}:\n{server.output()}")
            if time.monotonic() > deadline:
                raise ServerNotReady(f"the server was not ready within {start_timeout_s:.0f} s:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        stop(process, timeout_s=30)


def ready(url: str) -> bool:
    """Whether `url` answers 200 (within 5 s)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def service_process(
    model_dir: Path, log_dir: Path, *, cores: set[int] | None = None, **settings: object
) -> Iterator[ServiceProcess]:
    """`python -m app` with these settings on a free loopback port, as server_process runs it."""
    port = free_port()
    environment = service_environment(model_dir, PORT=port, **settings)
    log = log_dir / f"service-{port}.log"
    with server_process([sys.executable, "-m", "app"], port, log, env=environment, cores=cores) as service:
        yield service
