"""The machine's Docker engine for the tests that use it (tests/test_docker.py, tests/test_vm_recipe.py): the
client, whether the engine and the base images are there (the tests skip, saying why, where they are not), and
waiting on a container.

On these machines `../shared/tools/docker-standins .` (run as root; .ci/run does) installs Debian's engine and
docker-compose v1 and builds local stand-ins for the base images, since no registry is reachable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings

BASE_IMAGES = ("python:3.11-slim", "prom/prometheus:v2.53.0", "caddy:2.8")
DEADLINE_S = 180  # guards against hanging, not a performance expectation
BUILD_TIMEOUT_S = 1200  # a first build downloads every dependency

# Debian's client matches Debian's engine (docker-standins); otherwise whichever `docker` is on PATH.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"


def run(*command: str, timeout: float = DEADLINE_S, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **options)


def compose_command() -> list[str]:
    """docker-compose v1 where it is installed (the stand-ins'), else Compose v2's plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return [DOCKER, "compose"]


def why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the Docker engine here is root's)"
    if shutil.which(DOCKER) is None or run(DOCKER, "info").returncode != 0:
        return "no Docker engine answers: run ../shared/tools/docker-standins . as root"
    if run(*compose_command(), "version").returncode != 0:
        return "neither docker-compose nor the docker compose plugin is installed"
    missing = [image for image in BASE_IMAGES if run(DOCKER, "image", "inspect", image).returncode != 0]
    if missing:
        return f"base images {missing} are missing and there is no registry: run ../shared/tools/docker-standins ."
    return None


REASON = why_not_runnable()
needs_docker = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def users_environment() -> dict[str, str]:
    """This process's environment without the service's settings (the suite sets some for its own servers), as
    a user's shell would pass it to compose."""
    return {key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields}


def docker(*args: str, timeout: float = DEADLINE_S) -> str:
    result = run(DOCKER, *args, timeout=timeout)
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout.strip()


def inspect(container: str) -> dict[str, Any]:
    return json.loads(docker("inspect", container))[0]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(1)


@dataclass
class Published:
    """Where a compose project of docker-compose.yml publishes its ports on this machine, from the variables in
    `env` that set them (APP_PORT, APP_GRPC_PORT, PROMETHEUS_PORT, TLS_PORT)."""

    env: dict[str, str]

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.env['APP_PORT']}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.env['APP_GRPC_PORT']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.env['PROMETHEUS_PORT']}"

    @property
    def tls_address(self) -> str:
        return f"127.0.0.1:{self.env['TLS_PORT']}"


def oom_kills(pid: int) -> int:
    """The processes the kernel killed for memory in the cgroup of process `pid` (a container's), from the cgroup's
    own count: cgroup v1's memory.oom_control, v2's memory.events."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] == "memory"]
    if v1:
        counts = Path(f"/sys/fs/cgroup/memory{v1[0]}/memory.oom_control").read_text()
    else:
        counts = Path(f"/sys/fs/cgroup{lines[0].split(':', 2)[2]}/memory.events").read_text()
    return next(int(line.split()[1]) for line in counts.splitlines() if line.startswith("oom_kill "))


def ready(url: str, **options: Any) -> bool:
    """Whether the service at `url` answers /readyz with 200 (False while a new container is not listening yet)."""
    try:
        return httpx.get(f"{url}/readyz", timeout=5, **options).status_code == 200
    except httpx.TransportError:
        return False
