"""`python -m app` in a child process, for the tests that need the real entry point: signals, exit codes, and the
server's own resident memory; any other HTTP server in a child process too (the benchmarks' peer servers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

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


class NotReady(RuntimeError):
    """A server exited, or did not answer its readiness path in time."""


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
        _wait_until_ready(server, ready_path, start_timeout_s)
        yield server
    finally:
        stop(process, timeout_s=30)


@contextmanager
def service_process(
    model_dir: Path, log_dir: Path, *, cores: set[int] | None = None, **settings: object
) -> Iterator[ServiceProcess]:
    """`python -m app` with these settings on a free loopback port, as server_process runs it."""
    port = free_port()
    environment = service_environment(model_dir, PORT=port, **settings)
    command = [sys.executable, "-m", "app"]
    with server_process(command, port, log_dir / f"service-{port}.log", env=environment, cores=cores) as service:
        yield service


def _wait_until_ready(server: ServiceProcess, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise NotReady(f"the server exited with {server.process.returncode}:\n{server.output()}")
            try:
                if client.get(path).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise NotReady(f"the server was not ready within {timeout_s:.0f} s:\n{server.output()}")
