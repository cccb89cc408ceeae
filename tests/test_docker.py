"""The image and the compose stack, for real: build (test preset), `docker-compose up` with an API key and the TLS
profile, predict through the published port and through Caddy (HTTPS and gRPC over TLS), Prometheus scraping the
app, the load generator, the CPU quota, a user's model directory mounted into a second stack, start-up failures
that say what to fix, and a clean `docker stop`.

Runs as root where a Docker engine answers and the base images exist: on these machines,
`../shared/tools/docker-standins .` sets that up (.ci/run does). Skipped anywhere else.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from PIL import Image

from app.settings import Settings
from bench.hostile import AttackTarget, Kind, Outcome, kinds, storm
from bench.service import free_port
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode
from tests.support import infer_body
from tests.third_party import TABULAR_FEATURES

REPO = Path(__file__).resolve().parents[1]
IMAGE = "onnx-ensemble-serving:test"  # docker-compose.yml's image name with MODEL_PRESET=test
BASE_IMAGES = ("python:3.11-slim", "prom/prometheus:v2.53.0", "caddy:2.8")
MODES = {mode.value for mode in Mode}  # the test build ships the int8 graph: every mode is served
DEADLINE_S = 180  # guards against hanging, not a performance expectation
API_KEY = "a-compose-test-key-of-32-characters"
AUTHORIZED = {"Authorization": f"Bearer {API_KEY}"}
CADDY_ROOT = "/data/caddy/pki/authorities/local/root.crt"
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

    @property
    def tls_address(self) -> str:
        return f"127.0.0.1:{self.env['TLS_PORT']}"

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
        **{key: value for key, value in os.environ.items() if key.lower() not in Settings.model_fields},
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


@pytest.fixture(scope="module")
def users_model(tabular_dir: Path) -> Iterator[Path]:
    """A copy of a user's fused ensemble (third-party tabular members) that the container's user can read."""
    with tempfile.TemporaryDirectory(prefix="user-models-") as mount:
        target = Path(mount) / "my-ensemble"
        shutil.copytree(tabular_dir, target)
        for path in (Path(mount), *Path(mount).rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield target


def test_a_mounted_model_directory_is_what_is_served(image: str, users_model: Path) -> None:
    variables = {"MODEL_MOUNT": str(users_model.parent), "MODEL_DIR": f"/mnt/models/{users_model.name}"}
    with compose_stack("user", **variables) as user, httpx.Client(base_url=user.app_url, timeout=30) as client:
        ready = client.get("/readyz").json()
        assert (ready["model"], ready["sha256"]) == ("tabular", load_manifest(users_model).ensemble.sha256)
        rows = np.zeros((2, TABULAR_FEATURES), np.float32)
        response = client.post("/v2/models/tabular/infer", json=infer_body(rows, ["label"], input_name="X"))
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [2]


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
    cgroup memory limit with no swap: refused with the right status, ordinary requests answered throughout, the
    peak resident memory under the limit, and the container never killed nor restarted."""
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
        outcomes, ordinary = storm(target, inspect(container)["State"]["Pid"])
        for outcome, kind in zip(outcomes, kinds(target), strict=True):
            print(f"{outcome.kind}: peak RSS {outcome.peak_rss_bytes / 2**20:.0f} MiB, {dict(outcome.at_once)}")
            assert not unexpected(outcome, kind), (outcome.kind, outcome.alone, outcome.at_once)
            assert outcome.peak_rss_bytes < MEMORY_LIMIT, outcome.kind
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


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:  # the new container is not listening yet
        return False


def test_a_release_is_upgraded_to_and_rolled_back_from(image: str) -> None:
    """deploy/release as docs/operations.md runs it: the first release, a second with other weights (MODEL_SEED:
    another model, another sha256), the upgrade to it, and the rollback, after which the app serves the first
    release's model again. It leaves the test preset's tag on the first release, the `image` fixture's."""
    with compose_stack("release") as stack:
        compose = [*compose_command(), "--project-name", stack.project, "--file", str(REPO / "docker-compose.yml")]

        def release(*args: str, **variables: str) -> str:
            environment = {**stack.env, "COMPOSE": " ".join(compose), **variables}
            result = run(str(REPO / "deploy" / "release"), *args, env=environment, cwd=REPO, timeout=BUILD_TIMEOUT_S)
            assert result.returncode == 0, f"release {' '.join(args)}: {result.stderr[-3000:]}"
            return result.stdout.strip()

        def served() -> str:
            """The sha256 the app serves once it is ready (`deploy` returns once the new container has started)."""
            wait_until(lambda: ready(stack.app_url), "the app to be ready")
            return httpx.get(f"{stack.app_url}/readyz", timeout=30).json()["sha256"]

        first = release("build")
        second = release("build", MODEL_SEED="7")
        assert first != second and first.split("-")[0] == second.split("-")[0]  # one version, two models
        assert served().startswith(first.split("-")[-1])
        release("deploy", second)
        assert served().startswith(second.split("-")[-1])
        release("deploy", first)  # the rollback
        assert served().startswith(first.split("-")[-1])
        assert {first, second} <= set(release("list").splitlines())
    assert docker("image", "inspect", "--format", "{{.Id}}", IMAGE) == docker(
        "image", "inspect", "--format", "{{.Id}}", f"onnx-ensemble-serving:{first}"
    )
