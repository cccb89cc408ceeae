"""The image and the compose stack, for real: build (test preset), `docker-compose up`, predict through the
published port, Prometheus scraping the app, the load generator, and a clean `docker stop`.

Runs as root where a Docker engine answers and the base images exist: on these machines,
`../shared/tools/docker-standins .` sets that up (.ci/run does). Skipped anywhere else.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image

from bench.http_load import free_port
from ensemble_contract.modes import Mode

REPO = Path(__file__).resolve().parents[1]
IMAGE = "onnx-ensemble-serving:test"  # docker-compose.yml's image name with MODEL_PRESET=test
BASE_IMAGES = ("python:3.11-slim", "prom/prometheus:v2.53.0")
MODES = {mode.value for mode in Mode}  # the test build ships the int8 graph: every mode is served
DEADLINE_S = 180  # guards against hanging, not a performance expectation
BUILD_TIMEOUT_S = 1200  # a first build downloads every dependency

# Debian's client matches Debian's engine (docker-standins); otherwise whichever `docker` is on PATH.
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker") or "docker"


def run(*command: str, timeout: float = DEADLINE_S, **options: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **options)


def compose_command() -> list[str]:
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
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


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


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built with the tiny test preset (reusing Docker's layer cache from earlier builds)."""
    docker("build", "--build-arg", "MODEL_PRESET=test", "--tag", IMAGE, str(REPO), timeout=BUILD_TIMEOUT_S)
    return IMAGE


@dataclass
class Stack:
    """A project of the repo's docker-compose.yml."""

    project: str
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

    def compose(self, *args: str, check: bool = True) -> str:
        command = [*compose_command(), "--project-name", self.project, "--file", str(REPO / "docker-compose.yml")]
        result = run(*command, *args, env=self.env, cwd=REPO)
        assert not check or result.returncode == 0, f"compose {' '.join(args)}: {result.stdout[-3000:]}{result.stderr}"
        return result.stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()


@pytest.fixture(scope="module")
def stack(image: str) -> Iterator[Stack]:
    """`docker-compose up -d` of the app (test preset) and Prometheus on free ports; `down -v` whatever happens."""
    env = {
        **os.environ,
        "MODEL_PRESET": "test",  # selects the image the `image` fixture built
        "APP_PORT": str(free_port()),
        "APP_GRPC_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "APP_CPUS": "1",
        "APP_MEMORY": "1g",
        "LOADGEN_COUNT": str(3 * len(MODES)),
        "LOADGEN_RATE": "20",
    }
    stack = Stack(project=f"ensembletest{os.getpid()}", env=env)
    try:
        stack.compose("up", "-d")
        app = stack.container("app")
        wait_until(lambda: inspect(app)["State"]["Health"]["Status"] == "healthy", "the app's health check to pass")
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", check=False)


def test_app_container_is_locked_down(stack: Stack) -> None:
    app = stack.container("app")
    assert docker("exec", app, "id", "-u") != "0"
    host = inspect(app)["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["NanoCpus"] == 10**9  # APP_CPUS=1
    assert host["Memory"] == 2**30  # APP_MEMORY=1g
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    docker("exec", app, "python", "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)")
    image_env = json.loads(docker("image", "inspect", "--format", "{{json .Config.Env}}", IMAGE))
    assert not [variable for variable in image_env if variable.startswith("API_KEY")]  # no secret baked in


def test_predicts_through_the_published_port(stack: Stack) -> None:
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 40, 40)).save(png, format="PNG")
    files = {"file": ("red.png", png.getvalue(), "image/png")}
    response = httpx.post(f"{stack.app_url}/predict", params={"mode": "sequential"}, files=files, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["mode"] == "sequential"
    assert response.json()["model"]["name"] == "shapes-test"


def test_grpc_through_the_published_port(stack: Stack) -> None:
    with triton_grpc.InferenceServerClient(stack.grpc_address) as client:
        assert client.is_model_ready("shapes-test")
        image = triton_grpc.InferInput("image", [1, 3, 32, 32], "FP32")
        image.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        result = client.infer("shapes-test", [image], parameters={"mode": "parallel"})
    assert result.as_numpy("class_probs").shape == (1, 4)


def test_prometheus_scrapes_the_app_and_sees_the_load_generator(stack: Stack) -> None:
    prometheus = httpx.Client(base_url=stack.prometheus_url, timeout=10)

    def app_target_up() -> bool:
        response = prometheus.get("/api/v1/targets")
        targets = response.json()["data"]["activeTargets"] if response.status_code == 200 else []
        return any(t["labels"]["job"] == "ensemble" and t["health"] == "up" for t in targets)

    def modes_counted() -> set[str]:
        query = 'sum by (mode) (ensemble_request_seconds_count{job="ensemble"}) >= 3'
        return {
            s["metric"]["mode"]
            for s in prometheus.get("/api/v1/query", params={"query": query}).json()["data"]["result"]
        }

    wait_until(app_target_up, "Prometheus to scrape the app")
    summary = stack.compose("--profile", "loadgen", "run", "--rm", "loadgen")  # 3 per mode, in compare mode
    assert all(f"{mode}: 3 ok" in summary for mode in MODES), summary
    wait_until(lambda: modes_counted() == MODES, "Prometheus to count the load generator's requests of every mode")


def test_docker_stop_shuts_the_server_down_cleanly(image: str) -> None:
    container = docker("run", "--detach", "--read-only", "--tmpfs", "/tmp", image)
    try:
        # the image's health check, run now rather than on its 10 s interval
        healthy = [DOCKER, "exec", container, "python", "/srv/deploy/healthcheck.py"]
        wait_until(lambda: run(*healthy).returncode == 0, "the server to be ready")
        docker("stop", "--time", "30", container)
        state = inspect(container)["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0)  # 137 (SIGKILL) had it ignored SIGTERM
    finally:
        run(DOCKER, "rm", "--force", container)
