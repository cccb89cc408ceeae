"""The image and the compose stack, for real: build (test preset), `docker-compose up` with an API key and the TLS
profile, predict through the published port and through Caddy (HTTPS and gRPC over TLS), the documented Python
clients, Prometheus scraping the app, the load generator, the CPU quota, start-up failures that say what to fix,
hostile requests under a memory limit, and a clean `docker stop`. (docs/operations.md's VM recipe, releases and a
user's mounted model directory are tests/test_vm_recipe.py's.)

Runs as root where a Docker engine answers and the base images exist (tests/dockerhost.py); skipped elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image

from bench.hostile import AttackTarget, Kind, Outcome, kinds, storm
from bench.service import free_port
from ensemble_contract.modes import Mode
from tests.dockerhost import (
    BUILD_TIMEOUT_S,
    DOCKER,
    Published,
    compose_command,
    docker,
    inspect,
    needs_docker,
    oom_kills,
    run,
    users_environment,
    wait_until,
)
from tests.support import infer_body

REPO = Path(__file__).resolve().parents[1]
IMAGE = "onnx-ensemble-serving:test"  # docker-compose.yml's image name with MODEL_PRESET=test
MODES = {mode.value for mode in Mode}  # the test build ships the int8 graph: every mode is served
API_KEY = "a-compose-test-key-of-32-characters"
AUTHORIZED = {"Authorization": f"Bearer {API_KEY}"}
CADDY_ROOT = "/data/caddy/pki/authorities/local/root.crt"

pytestmark = needs_docker


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built with the tiny test preset (reusing Docker's layer cache from earlier builds)."""
    docker("build", "--build-arg", "MODEL_PRESET=test", "--tag", IMAGE, str(REPO), timeout=BUILD_TIMEOUT_S)
    return IMAGE


@dataclass
class Stack(Published):
    """A project of the repo's docker-compose.yml."""

    project: str

    def compose(self, *args: str, check: bool = True) -> str:
        command = [*compose_command(), "--project-name", self.project, "--file", str(REPO / "docker-compose.yml")]
        result = run(*command, *args, env=self.env, cwd=REPO)
        assert not check or result.returncode == 0, f"compose {' '.join(args)}: {result.stdout[-3000:]}{result.stderr}"
        return result.stdout

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()


@contextmanager
def compose_stack(name: str, **variables: str) -> Iterator[Stack]:
    """`docker-compose up -d` of the app (test preset) and Prometheus on free ports, with the given variables, as
    a user's environment or .env would set them; `down -v` whatever happens."""
    env = {
        **users_environment(),
        "MODEL_PRESET": "test",  # selects the image the `image` fixture built
        "APP_PORT": str(free_port()),
        "APP_GRPC_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(free_port()),
        "APP_MEMORY": "1g",
        **variables,
    }
    stack = Stack(project=f"ensemble{name}{os.getpid()}", env=env)
    try:
        stack.compose("up", "-d")
        app = stack.container("app")
        wait_until(lambda: inspect(app)["State"]["Health"]["Status"] == "healthy", "the app's health check to pass")
        yield stack
    finally:
        stack.compose("down", "--volumes", "--remove-orphans", check=False)


@pytest.fixture(scope="module")
def stack(image: str) -> Iterator[Stack]:
    """The stack as docs/operations.md sets it up on a VM: an API key, Caddy with TLS in front (its own CA, for a
    bare IP, with ACME_EMAIL left empty as an uncommented .env.example line leaves it), a body limit above the
    default, the app's ports published on loopback only, one core's quota."""
    with compose_stack(
        "main",
        API_KEY=API_KEY,
        COMPOSE_PROFILES="tls",
        APP_BIND="127.0.0.1",
        SITE_ADDRESS="127.0.0.1",
        ACME_EMAIL="",
        MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        TLS_PORT=str(free_port()),
        HTTP_PORT=str(free_port()),
        APP_CPUS="1",
        LOADGEN_COUNT=str(3 * len(MODES)),
        LOADGEN_RATE="20",
    ) as main:
        yield main


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


def red_png() -> dict[str, tuple[str, bytes, str]]:
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 40, 40)).save(png, format="PNG")
    return {"file": ("red.png", png.getvalue(), "image/png")}


def test_predicts_through_the_published_port(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.app_url}/predict", params={"mode": "sequential"}, files=red_png(), headers=AUTHORIZED, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["mode"] == "sequential"
    assert response.json()["model"]["name"] == "shapes-test"


def test_the_api_key_given_to_compose_guards_the_service(stack: Stack) -> None:
    with httpx.Client(base_url=stack.app_url, timeout=30) as client:
        assert client.post("/predict", files=red_png()).status_code == 401
        tensor = infer_body(np.zeros((1, 3, 32, 32), np.float32))
        assert client.post("/v2/models/shapes-test/infer", json=tensor).status_code == 401
        assert client.post("/v2/models/shapes-test/infer", json=tensor, headers=AUTHORIZED).status_code == 200
        assert client.post("/v2/repository/models/shapes-test/unload", headers=AUTHORIZED).status_code == 403
        assert client.get("/metrics").status_code == 404  # on the metrics port, which only Prometheus reaches


def grpc_infer(client: triton_grpc.InferenceServerClient) -> np.ndarray:
    image = triton_grpc.InferInput("image", [1, 3, 32, 32], "FP32")
    image.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    metadata = {"authorization": AUTHORIZED["Authorization"]}  # gRPC metadata keys are lower case
    result = client.infer("shapes-test", [image], parameters={"mode": "parallel"}, headers=metadata)
    return result.as_numpy("class_probs")


def test_grpc_through_the_published_port(stack: Stack) -> None:
    with triton_grpc.InferenceServerClient(stack.grpc_address) as client:
        assert client.is_model_ready("shapes-test")
        assert grpc_infer(client).shape == (1, 4)


@pytest.fixture(scope="module")
def caddy_root(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root certificate of Caddy's own CA, which signed the bare IP's certificate: what a client trusts."""
    path = tmp_path_factory.mktemp("caddy") / "root.crt"
    read = [*compose_command(), "--project-name", stack.project, "--file", str(REPO / "docker-compose.yml")]
    read += ["exec", "-T", "proxy", "cat", CADDY_ROOT]
    wait_until(lambda: run(*read, env=stack.env, cwd=REPO).returncode == 0, "Caddy's root certificate")
    path.write_text(run(*read, env=stack.env, cwd=REPO).stdout)
    return path


def test_https_through_the_proxy(stack: Stack, caddy_root: Path) -> None:
    trust = ssl.create_default_context(cafile=str(caddy_root))
    with httpx.Client(base_url=f"https://{stack.tls_address}", verify=trust) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the proxy to reach the app")
        response = client.post("/predict", files=red_png(), headers=AUTHORIZED, timeout=30)
        assert response.status_code == 200, response.text
        assert client.post("/predict", files=red_png(), timeout=30).status_code == 401
    with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused: the CA is Caddy's own
        httpx.get(f"https://{stack.tls_address}/readyz", timeout=10)


UPLOAD_LIMIT = 25 * 2**20  # the stack's MAX_UPLOAD_BYTES: above Caddy's former fixed 20 MB


def test_the_proxy_passes_what_the_app_takes(stack: Stack, caddy_root: Path) -> None:
    """MAX_UPLOAD_BYTES bounds a body at the proxy as at the app: 21 MiB, over the default 20 MiB, reach the app,
    which answers that they are no image; over the limit, the answer is a refusal."""
    trust = ssl.create_default_context(cafile=str(caddy_root))
    headers = {**AUTHORIZED, "Content-Type": "image/png"}
    with httpx.Client(base_url=f"https://{stack.tls_address}", verify=trust, timeout=60) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the proxy to reach the app")
        taken = client.post("/predict", content=b"\0" * (21 * 2**20), headers=headers)
        assert (taken.status_code, taken.json()["error"]["code"]) == (400, "bad_image"), taken.text
        refused = client.post("/predict", content=b"\0" * (UPLOAD_LIMIT + 1), headers=headers)
        assert refused.status_code == 413, refused.text


def client_blocks() -> list[str]:
    """The Python blocks of docs/api.md's "Python clients", in order."""
    section = (REPO / "docs" / "api.md").read_text().split("## Python clients", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_documented_python_clients_agree_through_the_proxy(
    stack: Stack, caddy_root: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/api.md's client blocks, run as they are with the key and Caddy's CA: /predict with a file, /v2 binary
    over HTTP and gRPC with the tensor the manifest's preprocessing makes, all three the same probabilities."""
    trust = ssl.create_default_context(cafile=str(caddy_root))
    with httpx.Client(base_url=f"https://{stack.tls_address}", verify=trust) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the proxy to reach the app")
    names = {"ADDRESS": stack.tls_address, "API_KEY": API_KEY, "CA": str(caddy_root), "MODEL_DIR": model_dir}
    monkeypatch.chdir(REPO)  # the blocks name docs/example.png as a reader in the checkout would
    blocks = client_blocks()
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), names)  # the documentation's own code, as a reader runs it
    labels = names["manifest"].image.labels
    predicted = np.array([names["predict_probabilities"][label] for label in labels])
    assert np.allclose(names["http_probabilities"], predicted, atol=1e-3)
    assert np.allclose(names["grpc_probabilities"], names["http_probabilities"], atol=1e-6)


def test_curl_trusts_the_proxy_with_the_ca_root(stack: Stack, caddy_root: Path) -> None:
    result = run("curl", "-sS", "--fail", "--cacert", str(caddy_root), f"https://{stack.tls_address}/readyz")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"] == "shapes-test"


def test_grpc_over_tls_through_the_proxy(stack: Stack, caddy_root: Path) -> None:
    with triton_grpc.InferenceServerClient(stack.tls_address, ssl=True, root_certificates=str(caddy_root)) as client:
        assert client.is_model_ready("shapes-test")
        assert grpc_infer(client).shape == (1, 4)


PROXY_HEADER_TIMEOUT_S = 10  # deploy/caddy/Caddyfile's read_header


def test_the_proxy_cuts_off_a_client_that_sends_its_headers_too_slowly(stack: Stack, caddy_root: Path) -> None:
    """Uvicorn has no timeout for headers that trickle in; Caddy in front has: a header line every 2 s is cut off
    once the headers have taken read_header (10 s), and the connection closed."""
    trust = ssl.create_default_context(cafile=str(caddy_root))
    host, port = stack.tls_address.split(":")
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        trust.wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started, closed_after = time.monotonic(), None
        tls.settimeout(2)
        while time.monotonic() - started < 3 * PROXY_HEADER_TIMEOUT_S:
            try:
                tls.sendall(b"X-Slow: a header line every 2 s\r\n")
                if tls.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the proxy held the slow client past three times its header timeout"
    assert closed_after < 2 * PROXY_HEADER_TIMEOUT_S


def test_only_the_proxy_is_published_beyond_loopback(stack: Stack) -> None:
    def host_addresses(service: str) -> set[str]:
        bindings = inspect(stack.container(service))["HostConfig"]["PortBindings"]
        return {binding["HostIp"] for port in bindings.values() for binding in port}

    assert host_addresses("app") == {"127.0.0.1"}
    assert host_addresses("proxy") <= {"", "0.0.0.0"}  # every interface


def test_the_cpu_quota_sizes_the_service(stack: Stack) -> None:
    """compose's `cpus: 1` is a CFS quota of one core on this 2-core machine: the service counts 1, from the
    cgroup, and says so in its log, /stats and its metrics."""
    stats = httpx.get(f"{stack.app_url}/stats", timeout=10).json()
    assert stats["cores"] == 1
    assert stats["cores_source"].startswith("1 (cgroup quota 100000/100000")
    log = stack.compose("logs", "app")
    assert "cores 1 (cgroup quota 100000/100000" in log
    assert "intra_op=1" in log and f"intra_op={os.cpu_count()}" not in log
    prometheus = httpx.Client(base_url=stack.prometheus_url, timeout=10)

    def cores() -> list[Any]:
        result = prometheus.get("/api/v1/query", params={"query": "ensemble_cores"}).json()["data"]["result"]
        return [(series["metric"]["source"], series["value"][1]) for series in result]

    wait_until(lambda: cores() == [("cgroup", "1")], "Prometheus to scrape the core count")


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
    summary = stack.compose("--profile", "loadgen", "run", "--rm", "loadgen")  # 3 per mode, with the API key
    assert all(f"{mode}: 3 ok" in summary for mode in MODES), summary
    wait_until(lambda: modes_counted() == MODES, "Prometheus to count the load generator's requests of every mode")


@pytest.mark.parametrize(
    ("environment", "status", "message"),
    [
        (["MAX_QUEUE=lots"], 2, "cannot start: invalid configuration: MAX_QUEUE='lots'"),
        (["MODEL_CONTROL=explicit"], 2, "MODEL_CONTROL=explicit lets any caller unload the model: set MODEL_CONTROL"),
        (["MODEL_DIR=/mnt/models"], 3, "no manifest.json in /mnt/models"),
    ],
)
def test_a_bad_configuration_stops_the_container_with_one_line(
    image: str, tmp_path: Path, environment: list[str], status: int, message: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    flags = [flag for variable in environment for flag in ("--env", variable)]
    result = run(DOCKER, "run", "--rm", "--read-only", "--volume", f"{empty}:/mnt/models:ro", *flags, image)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "cannot start" in line]
    assert result.returncode == status, result.stdout + result.stderr
    assert len(lines) == 1 and message in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr


MEMORY_LIMIT = 512 * 2**20  # the test models' server idles near 150 MB: a tight limit


def unexpected(outcome: Outcome, kind: Kind) -> set[int]:
    got = (set(outcome.alone) | set(outcome.at_once)) - {503}
    return got - kind.expected if kind.expected else {status for status in got if 500 <= status < 600}


def test_hostile_requests_under_a_memory_limit(image: str) -> None:
    """The worst request of each kind (bench/hostile.py), alone and 16 at once, against the image in a real
    cgroup memory limit with no swap: refused with the right status, ordinary requests answered throughout, no
    process of the container killed for memory (the cgroup's own count: each process's peak RSS, printed, counts
    mapped library files the kernel reclaims under the limit), and the container never restarted."""
    port = free_port()
    limit = str(MEMORY_LIMIT)
    container = docker(
        "run", "--detach", "--memory", limit, "--memory-swap", limit, "--read-only", "--tmpfs", "/tmp:size=64m",
        "--env", f"API_KEY={API_KEY}", "--publish", f"127.0.0.1:{port}:8000", image,
    )  # fmt: skip
    try:
        healthy = [DOCKER, "exec", container, "python", "/srv/deploy/healthcheck.py"]
        wait_until(lambda: run(*healthy).returncode == 0, "the server to be ready")
        target = AttackTarget(f"http://127.0.0.1:{port}", API_KEY, "shapes-test", image_size=32)
        pid = inspect(container)["State"]["Pid"]
        outcomes, ordinary = storm(target, pid)
        for outcome, kind in zip(outcomes, kinds(target), strict=True):
            print(f"{outcome.kind}: peak RSS {outcome.peak_rss_bytes / 2**20:.0f} MiB, {dict(outcome.at_once)}")
            assert not unexpected(outcome, kind), (outcome.kind, outcome.alone, outcome.at_once)
        assert oom_kills(pid) == 0
        assert ordinary[0] == 0 and not [status for status in ordinary if status < 0], ordinary
        assert ordinary[200] > 0, ordinary
        state = inspect(container)
        assert state["State"]["Running"] and not state["State"]["OOMKilled"] and state["RestartCount"] == 0
        with httpx.Client(base_url=target.url, timeout=30, headers=target.headers()) as client:
            assert client.post("/predict", files=red_png()).status_code == 200
    finally:
        run(DOCKER, "rm", "--force", container)


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
