"""Servers the load bench starts itself, each on a free loopback port, stopped when done."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"


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
) -> Iterator[Server]:
    """Runs `python ARGS` (`-m app`, a script) with `env` added, waits for `ready_path`, and stops it afterwards."""
    url = f"http://{LOOPBACK}:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as output:
        process = subprocess.Popen(
            [python, *args],
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(url, ready_path, timeout_s, process)
            yield Server(url, process.pid)
        except ServerError as exc:
            raise ServerError(f"{exc}; its log: {log}") from None
        finally:
            stop(process, timeout_s=15)
