"""`python -m app` in a child process, for the tests that need the real entry point: signals, exit codes, and the
server's own resident memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.settings import Settings

START_TIMEOUT_S = 60
LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


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


def service_environment(model_dir: Path, **settings: object) -> dict[str, str]:
    """This process's environment without any of the service's variables, then the test's settings."""
    environment = {key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields}
    environment |= {"MODEL_DIR": str(model_dir), "HOST": "127.0.0.1", "LOG_LEVEL": "warning"}
    environment |= {name.upper(): str(value) for name, value in settings.items()}
    return environment


def run_to_exit(
    model_dir: Path, timeout_s: float = START_TIMEOUT_S, **settings: object
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m app` until it exits by itself (a start-up failure); its exit code and output."""
    environment = service_environment(model_dir, **({"PORT": free_port()} | settings))
    return subprocess.run(
        [sys.executable, "-m", "app"], env=environment, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **options)  # type: ignore[arg-type]

    def rss_bytes(self) -> int:
        """The server's resident memory (VmRSS)."""
        rss = resident_bytes(self.process.pid)
        assert rss is not None, "no VmRSS of the server in /proc"
        return rss

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def service_process(
    model_dir: Path, log_dir: Path, *, cores: set[int] | None = None, **settings: object
) -> Iterator[ServiceProcess]:
    """The service in a child process on a free loopback port (on `cores` only, if given), ready (its /readyz
    says 200) when yielded; stopped with SIGTERM (and killed if it does not stop) when the block ends."""
    port = free_port()
    log = log_dir / f"service-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            env=service_environment(model_dir, PORT=port, **settings),
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", port, log)
    try:
        _wait_until_ready(service)
        yield service
    finally:
        stop(process, timeout_s=30)


def _wait_until_ready(service: ServiceProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=service.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                pytest.fail(f"the service exited with {service.process.returncode}:\n{service.output()}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    pytest.fail(f"the service was not ready within {START_TIMEOUT_S} s:\n{service.output()}")
