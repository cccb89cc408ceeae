"""Reloading the model (the model repository extension, SIGHUP) without dropping a request.

Two builds of the same tabular ensemble (different member weights, so different graphs and sha256) and a broken
copy of one; MODEL_DIR is a symlink the tests switch between them, as an operator would.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import threading
import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton

from app.core.model import LoadedModel
from app.settings import Settings
from bench.service import ServiceProcess, free_port, service_process
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode
from tests.support import fuse, infer_json, live_server, scrape
from tests.third_party import TABULAR_FEATURES, export_tabular_members

NAME = "tabular"
ROWS = np.random.default_rng(3).normal(size=(4, TABULAR_FEATURES)).astype(np.float32)
WAIT_S = 120


@dataclass(frozen=True)
class Builds:
    a: Path
    b: Path
    broken: Path  # b with its fused graph changed after the manifest was written: the checksum fails
    current: Path  # the symlink MODEL_DIR points at

    def point_at(self, target: Path) -> None:
        """Switches the symlink atomically (a new link renamed over the old), as a deployment would."""
        staging = self.current.with_name("current.new")
        staging.unlink(missing_ok=True)
        staging.symlink_to(target)
        staging.replace(self.current)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    work = tmp_path_factory.mktemp("reload")
    members = export_tabular_members(work)
    for name, weights in (("a", "1,2,1"), ("b", "3,1,1")):
        result = fuse(*members, "--out", work / name, "--name", NAME, "--weights", weights)
        assert result.returncode == 0, result.stderr
    broken = Path(shutil.copytree(work / "b", work / "broken"))
    with (broken / load_manifest(broken).ensemble.path).open("ab") as graph:
        graph.write(b"\0")
    (work / "current").symlink_to(work / "a")
    return Builds(work / "a", work / "b", broken, work / "current")


def sha256(model_dir: Path) -> str:
    return load_manifest(model_dir).ensemble.sha256


def expected_probabilities(model_dir: Path) -> np.ndarray:
    """What the fused graph itself answers for ROWS, run directly with ONNX Runtime."""
    session = ort.InferenceSession(str(model_dir / load_manifest(model_dir).ensemble.path))
    return session.run(["probabilities"], {"X": ROWS})[0]


def served_sha256(client: httpx.Client) -> str:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    return response.json()["sha256"]


def served_by_every_worker(client: httpx.Client) -> set[str]:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    return {worker["sha256"] for worker in response.json()["workers"]}


def load(client: httpx.Client, name: str = NAME) -> httpx.Response:
    return client.post(f"/v2/repository/models/{name}/load", timeout=WAIT_S)


def probabilities(client: httpx.Client) -> np.ndarray:
    output = infer_json(client, NAME, ROWS, ["probabilities"], input_name="X")["probabilities"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_a_reload_switches_models_and_frees_the_old_after_its_last_request(builds: Builds) -> None:
    builds.point_at(builds.a)
    with live_server(Settings(model_dir=builds.current, model_control="explicit")) as live, live.client() as client:
        assert served_sha256(client) == sha256(builds.a)
        old: LoadedModel = live.dataplane.model
        sessions = [weakref.ref(s) for sessions in old.runtime.session_sets for s in sessions.graphs.values()]
        in_flight = ExitStack()

        async def admit() -> None:  # a request that took the old model and has not finished
            in_flight.enter_context(live.dataplane.using())

        live.call(admit())
        builds.point_at(builds.b)
        response = load(client)
        assert response.status_code == 200, response.text
        assert response.json() | {"load_seconds": 0} == {
            "name": NAME,
            "sha256": sha256(builds.b),
            "previous_sha256": sha256(builds.a),
            "directory": str(builds.b),
            "load_seconds": 0,
        }
        assert served_sha256(client) == sha256(builds.b)
        np.testing.assert_allclose(probabilities(client), expected_probabilities(builds.b), rtol=1e-5)
        assert old.retired and old.in_flight == 1
        still = old.runtime.infer({"X": ROWS}, Mode.FUSED)["probabilities"]  # the old request can still finish
        np.testing.assert_allclose(still, expected_probabilities(builds.a), rtol=1e-5)

        async def finish() -> None:
            in_flight.close()

        live.call(finish())
        del old, still
        gc.collect()
        assert sessions and all(ref() is None for ref in sessions)
        info = next(dict(labels) for name, labels in scrape(client).samples if name == "ensemble_model_info")
        assert info["sha256"] == sha256(builds.b)


def test_loads_that_cannot_work_are_refused_and_the_old_model_keeps_serving(builds: Builds) -> None:
    builds.point_at(builds.a)
    with live_server(Settings(model_dir=builds.current, model_control="explicit")) as live, live.client() as client:
        builds.point_at(builds.broken)
        refused = load(client)
        assert refused.status_code == 400
        assert "ensemble.onnx has" in refused.json()["error"] and "the manifest says" in refused.json()["error"]
        assert f"still serving sha256 {sha256(builds.a)[:12]}" in refused.json()["error"]
        builds.point_at(builds.b)
        wrong_name = load(client, "other")
        assert wrong_name.status_code == 400
        assert "holds model 'tabular', not 'other'" in wrong_name.json()["error"]
        assert served_sha256(client) == sha256(builds.a)
        np.testing.assert_allclose(probabilities(client), expected_probabilities(builds.a), rtol=1e-5)
        metrics = scrape(client)
        assert metrics.value("ensemble_model_loads_total", outcome="failed") == 2
        assert metrics.value("ensemble_model_loads_total", outcome="ok") == 0
        index = client.post("/v2/repository/index").json()
        assert index == [
            {"name": NAME, "version": "", "state": "READY", "reason": ""},
            {
                "name": NAME,
                "version": "",
                "state": "UNAVAILABLE",
                "reason": f"MODEL_DIR holds sha256 {sha256(builds.b)[:12]}, not loaded",
            },
        ]


def test_unload_then_load(builds: Builds) -> None:
    builds.point_at(builds.a)
    with live_server(Settings(model_dir=builds.current, model_control="explicit")) as live, live.client() as client:
        assert client.post("/v2/repository/models/other/unload").status_code == 404
        assert client.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.get("/v2/health/ready").json() == {"ready": False}
        refused = client.post(
            f"/v2/models/{NAME}/infer", json={"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [0]}]}
        )
        assert refused.status_code == 503 and "no model is loaded" in refused.json()["error"]
        assert live.dataplane.model is None
        assert load(client).status_code == 200
        assert served_sha256(client) == sha256(builds.a)


def every_worker(client: httpx.Client, count: int) -> list[dict]:
    """The workers /readyz lists, once it lists `count` (the first to serve answers while the others load)."""
    deadline = time.monotonic() + WAIT_S
    while len(workers := client.get("/readyz").json()["workers"]) < count:
        assert time.monotonic() < deadline, workers
        time.sleep(0.1)
    return workers


def replaced_serving_nothing(service: ServiceProcess) -> bool:
    """Whether a dead worker's replacement has started and, as the other worker, serves no model (asked on a new
    connection: one made as the worker died may be reset)."""
    try:
        with service.client() as client:
            metrics = scrape(client)
    except httpx.TransportError:
        return False
    restarted = metrics.value("ensemble_worker_restarts_total") == 1 and metrics.value("ensemble_workers") == 2
    return restarted and not metrics.labels_of("ensemble_model_info", "worker")


def test_an_unload_and_a_load_reach_every_worker(builds: Builds, tmp_path: Path) -> None:
    """Through whichever worker the call lands on, every worker follows before the answer: fresh connections (which
    the kernel spreads over the workers) all find the model unloaded, then all find it loaded. A worker that dies
    meanwhile is replaced by one that serves what the others do: no model after the unload, the model after the
    load."""
    builds.point_at(builds.a)
    with service_process(builds.current, tmp_path, MODEL_CONTROL="explicit", WORKERS=2) as service:
        with service.client() as client:
            dying = every_worker(client, 2)[0]["pid"]
            assert client.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        os.kill(dying, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while not replaced_serving_nothing(service):
            assert time.monotonic() < deadline, service.output()
            time.sleep(0.1)
        for _ in range(10):
            with service.client() as fresh:
                assert fresh.get("/readyz").status_code == 503
        with service.client() as client:
            assert load(client).status_code == 200
        for _ in range(10):
            with service.client() as fresh:
                assert served_by_every_worker(fresh) == {sha256(builds.a)}
                assert np.allclose(probabilities(fresh), expected_probabilities(builds.a), rtol=1e-5)


def test_the_repository_needs_the_model_control_key_which_no_inference_key_opens(builds: Builds) -> None:
    builds.point_at(builds.a)
    inference, control = "a-long-enough-inference-key", "a-long-enough-model-control-key"
    settings = Settings(
        model_dir=builds.current, api_key=inference, model_control_key=control, model_control="explicit"
    )
    with live_server(settings) as live, live.client() as client:
        for path in (
            "/v2/repository/index",
            f"/v2/repository/models/{NAME}/load",
            f"/v2/repository/models/{NAME}/unload",
        ):
            assert client.post(path).status_code == 401, path
            assert client.post(path, headers={"Authorization": f"Bearer {inference}"}).status_code == 401, path
        assert client.post("/v2/repository/index", headers={"Authorization": f"Bearer {control}"}).status_code == 200
        refused = client.post(f"/v2/models/{NAME}/infer", json={}, headers={"Authorization": f"Bearer {control}"})
        assert refused.status_code == 401  # nor does the control key open inference
        assert live.dataplane.model is not None


def test_model_control_is_closed_unless_the_operator_opens_it(builds: Builds, tmp_path: Path) -> None:
    """With the default MODEL_CONTROL=none, no key needed or given: every repository call is refused over REST
    (403) and gRPC (PERMISSION_DENIED), and SIGHUP is logged and ignored; the model keeps serving."""
    builds.point_at(builds.a)
    grpc_port = free_port()
    with service_process(builds.current, tmp_path, GRPC_PORT=grpc_port) as service, service.client() as client:
        builds.point_at(builds.b)
        repository = "/v2/repository"
        for path in (f"{repository}/index", f"{repository}/models/{NAME}/load", f"{repository}/models/{NAME}/unload"):
            response = client.post(path)
            assert response.status_code == 403, path
            assert "MODEL_CONTROL=explicit" in response.json()["error"]
        with triton.InferenceServerClient(f"127.0.0.1:{grpc_port}") as grpc_client:
            for call in (grpc_client.unload_model, grpc_client.load_model):
                with pytest.raises(triton.InferenceServerException) as refused:
                    call(NAME)
                assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        os.kill(service.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + WAIT_S
        while "SIGHUP ignored" not in service.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "SIGHUP ignored: model control is off (MODEL_CONTROL=none)" in service.output()
        assert service.process.poll() is None
        assert served_sha256(client) == sha256(builds.a)
        assert np.allclose(probabilities(client), expected_probabilities(builds.a), rtol=1e-5)


@dataclass
class Traffic:
    """Clients sending requests in a loop until stopped; every answer must be one of the two models' own."""

    expected: list[np.ndarray]
    answered: list[int] = field(default_factory=lambda: [0, 0])  # by which model's outputs came back
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, got: np.ndarray) -> None:
        for i, expected in enumerate(self.expected):
            if got.shape == expected.shape and np.allclose(got, expected, rtol=1e-5):
                with self.lock:
                    self.answered[i] += 1
                return
        self.fail(f"outputs of neither model: {got.tolist()}")

    def fail(self, why: str) -> None:
        with self.lock:
            self.failures.append(why)

    def http_client(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:  # one keep-alive connection
            while not self.stop.is_set():
                try:
                    self.record(probabilities(client))
                except (AssertionError, httpx.HTTPError) as exc:
                    self.fail(f"http: {exc!r}")

    def grpc_client(self, address: str) -> None:
        with triton.InferenceServerClient(address) as client:
            while not self.stop.is_set():
                tensor = triton.InferInput("X", list(ROWS.shape), "FP32")
                tensor.set_data_from_numpy(ROWS)
                try:
                    self.record(client.infer(NAME, [tensor]).as_numpy("probabilities"))
                except Exception as exc:  # InferenceServerException and grpc's own errors alike
                    self.fail(f"grpc: {exc!r}")

    def total(self) -> int:
        with self.lock:
            return sum(self.answered)

    def wait_for_more(self, count: int) -> None:
        target = self.total() + count
        deadline = time.monotonic() + WAIT_S
        while self.total() < target and time.monotonic() < deadline and not self.failures:
            time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 2])
def test_two_reloads_under_load_drop_no_request(builds: Builds, tmp_path: Path, workers: int) -> None:
    """4 clients (2 over HTTP keep-alive, 2 over gRPC) while the model is reloaded twice (the repository API, then
    SIGHUP) and a broken build is refused: no failed request, no reset connection, every answer one model's. With
    two worker processes, each load switches both (the API's answer waits for it; SIGHUP goes to the supervisor)."""
    builds.point_at(builds.a)
    grpc_port = free_port()
    traffic = Traffic([expected_probabilities(builds.a), expected_probabilities(builds.b)])
    settings = {"GRPC_PORT": grpc_port, "MODEL_CONTROL": "explicit", "WORKERS": workers}
    with service_process(builds.current, tmp_path, **settings) as service, service.client() as client:
        clients = [threading.Thread(target=traffic.http_client, args=(service.url,)) for _ in range(2)]
        clients += [threading.Thread(target=traffic.grpc_client, args=(f"127.0.0.1:{grpc_port}",)) for _ in range(2)]
        for thread in clients:
            thread.start()
        try:
            traffic.wait_for_more(20)
            builds.point_at(builds.b)
            assert load(client).status_code == 200
            assert served_by_every_worker(client) == {sha256(builds.b)}
            traffic.wait_for_more(20)
            builds.point_at(builds.a)
            os.kill(service.process.pid, signal.SIGHUP)
            deadline = time.monotonic() + WAIT_S
            while served_by_every_worker(client) != {sha256(builds.a)} and time.monotonic() < deadline:
                time.sleep(0.1)
            assert served_by_every_worker(client) == {sha256(builds.a)}
            traffic.wait_for_more(20)
            builds.point_at(builds.broken)
            assert load(client).status_code == 400
            traffic.wait_for_more(20)
        finally:
            traffic.stop.set()
            for thread in clients:
                thread.join(timeout=WAIT_S)
        assert served_by_every_worker(client) == {sha256(builds.a)}
        metrics = scrape(client)
        assert metrics.value("ensemble_model_loads_total", outcome="ok") == 2 * workers  # each worker's loads
        assert metrics.value("ensemble_model_loads_total", outcome="failed") == 1  # refused: no worker followed
    assert traffic.failures == []
    assert all(count > 0 for count in traffic.answered), traffic.answered


def test_a_reload_under_auto_keeps_the_layout_and_times_the_new_models_modes(builds: Builds) -> None:
    builds.point_at(builds.a)
    settings = Settings(
        model_dir=builds.current, default_mode="auto", auto_budget_s=0.05, auto_window_ms=10, model_control="explicit"
    )
    with live_server(settings) as live, live.client() as client:
        first = client.get("/readyz").json()["auto"]
        builds.point_at(builds.b)
        assert load(client).status_code == 200
        again = client.get("/readyz").json()
        assert again["sha256"] == sha256(builds.b)
        assert {c["layout"] for c in again["auto"]["candidates"]} == {first["layout"]}
        assert {c["mode"] for c in again["auto"]["candidates"]} == set(again["modes"])
        assert live.dataplane.model.runtime.slots == first["slots"] == live.dataplane.scheduler.slots
