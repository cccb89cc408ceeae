"""WORKERS=2: two worker processes behind one port, under a supervisor, on real servers (`python -m app`).

Every request is counted once in /metrics and /stats whichever worker served it, connections spread over both,
a worker that dies is replaced and counted (its metric files folded into an archive), auto measures once, SIGTERM
drains both, SIGHUP while they start kills none, and a start-up failure stops them all with its exit status.
Reloads across workers: test_reload.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as triton

from app.engine.resources import usable_cores, usable_memory
from app.settings import Settings
from app.workers import WORKER_MEMORY_BYTES, resolve_workers
from bench.service import (
    LOOPBACK,
    REPO,
    ServiceProcess,
    free_port,
    service_environment,
    service_process,
    stop,
)
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from tests.support import Scrape, infer_json, run_to_exit, scrape

CLIENTS = 8  # keep-alive connections, each its own client
REQUESTS_EACH = 10
WAIT_S = 60


@dataclass(frozen=True)
class TwoWorkers:
    service: ServiceProcess
    ops: str  # the METRICS_PORT's URL
    grpc_port: int
    temporary: Path  # its TMPDIR, where the supervisor makes the workers' directory

    def scrape(self) -> Scrape:
        with httpx.Client(base_url=self.ops) as client:
            return scrape(client)

    def metric_files(self) -> list[str]:
        (directory,) = self.temporary.glob("ensemble-workers-*")
        return sorted(path.name for path in (directory / "metrics").glob("*.db"))


@pytest.fixture(scope="module")
def two_workers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoWorkers]:
    metrics_port, grpc_port = free_port(), free_port()
    logs, temporary = tmp_path_factory.mktemp("workers"), tmp_path_factory.mktemp("workers-tmp")
    with service_process(
        model_dir, logs, WORKERS=2, GRPC_PORT=grpc_port, METRICS_PORT=metrics_port, LOG_LEVEL="info", TMPDIR=temporary
    ) as service:
        yield TwoWorkers(service, f"http://127.0.0.1:{metrics_port}", grpc_port, temporary)


def readiness(service: ServiceProcess) -> dict:
    with service.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_workers(service: ServiceProcess, count: int, *, not_pids: set[int] = frozenset()) -> list[dict]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            workers = readiness(service)["workers"]
        except (AssertionError, httpx.TransportError):
            workers = []
        if len(workers) == count and not not_pids & {w["pid"] for w in workers}:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"not {count} workers within {WAIT_S} s:\n{service.output()}")


def send_from_many_connections(service: ServiceProcess, manifest: Manifest) -> None:
    """CLIENTS x REQUESTS_EACH requests, each client on its own keep-alive connection; every one answered right."""
    image, labels = manifest.example_inputs(1)["image"], manifest.image.labels
    failures: list[str] = []

    def client_loop() -> None:
        with service.client() as client:
            for _ in range(REQUESTS_EACH):
                try:
                    outputs = infer_json(client, manifest.name, image, ["class_probs"])
                    assert outputs["class_probs"]["shape"] == [1, len(labels)]
                except (AssertionError, httpx.HTTPError) as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert failures == []


def test_every_request_counts_once_whichever_worker_served_it(two_workers: TwoWorkers, manifest: Manifest) -> None:
    workers = wait_for_workers(two_workers.service, 2)
    assert len({w["pid"] for w in workers}) == 2
    assert {w["sha256"] for w in workers} == {manifest.ensemble.sha256}
    before = two_workers.scrape()
    send_from_many_connections(two_workers.service, manifest)
    after = two_workers.scrape()
    sent = CLIENTS * REQUESTS_EACH
    ok = "ensemble_predictions_total"
    assert after.total(ok, outcome="ok") - before.total(ok, outcome="ok") == sent
    count = "ensemble_request_seconds_count"
    assert after.total(count, mode=Mode.FUSED) - before.total(count, mode=Mode.FUSED) == sent
    served = {
        worker: after.value("ensemble_worker_http_requests_total", worker=worker)
        - before.value("ensemble_worker_http_requests_total", worker=worker)
        for worker in ("0", "1")
    }
    assert sum(served.values()) == sent
    assert all(n > 0 for n in served.values()), f"one worker got every connection: {served}"
    assert after.value("ensemble_workers") == 2
    assert after.labels_of("ensemble_model_info", "worker") == {"0", "1"}
    assert after.labels_of("process_resident_memory_bytes", "worker") == {"0", "1"}
    assert after.total("ensemble_memory_budget_bytes") > 0  # a gauge each worker sets, summed
    assert after.value("ensemble_inferences_admitted") == 0
    with two_workers.service.client() as client:
        stats = client.get("/stats").json()
    assert stats["workers"] == 2
    defaults = Settings()
    assert stats["admitted_at_most"] == 2 * (defaults.inference_slots + defaults.max_queue)
    assert stats["modes"][Mode.FUSED]["requests"] >= sent  # both workers' samples, not the answering one's


def test_a_worker_that_dies_is_replaced_and_counted(two_workers: TwoWorkers, manifest: Manifest) -> None:
    workers = wait_for_workers(two_workers.service, 2)
    before = two_workers.scrape()
    os.kill(workers[0]["pid"], signal.SIGKILL)
    replaced = wait_for_workers(two_workers.service, 2, not_pids={workers[0]["pid"]})
    assert {w["sha256"] for w in replaced} == {manifest.ensemble.sha256}
    after = two_workers.scrape()
    assert after.value("ensemble_worker_restarts_total") == before.value("ensemble_worker_restarts_total") + 1
    ok = "ensemble_predictions_total"
    assert after.total(ok, outcome="ok") == before.total(ok, outcome="ok")  # the dead worker's counts stay
    send_from_many_connections(two_workers.service, manifest)
    assert "replacing it" in two_workers.service.output()


def test_dead_workers_metric_files_are_folded_into_one_archive(two_workers: TwoWorkers, manifest: Manifest) -> None:
    """Workers killed one after another, each having served: every request still counts once, and the metrics
    directory (every scrape reads all of it) holds the live workers' files and one archive per type, no more."""
    before = two_workers.scrape()
    sent = 0
    for victim in (0, 1, 0):
        send_from_many_connections(two_workers.service, manifest)
        sent += CLIENTS * REQUESTS_EACH
        pid = next(w["pid"] for w in wait_for_workers(two_workers.service, 2) if w["worker"] == victim)
        os.kill(pid, signal.SIGKILL)
        wait_for_workers(two_workers.service, 2, not_pids={pid})
    after = two_workers.scrape()
    assert after.value("ensemble_worker_restarts_total") == before.value("ensemble_worker_restarts_total") + 3
    ok, count = "ensemble_predictions_total", "ensemble_request_seconds_count"
    assert after.total(ok, outcome="ok") - before.total(ok, outcome="ok") == sent
    assert after.total(count, mode=Mode.FUSED) - before.total(count, mode=Mode.FUSED) == sent
    live = {str(w["pid"]) for w in wait_for_workers(two_workers.service, 2)}
    files = two_workers.metric_files()
    assert {name.removesuffix(".db").rsplit("_", 1)[1] for name in files} == live | {"archive"}, files
    assert [name for name in files if name.endswith("_archive.db")] == ["counter_archive.db", "histogram_archive.db"]


def test_grpc_is_served_on_one_port_by_the_workers(two_workers: TwoWorkers, manifest: Manifest) -> None:
    wait_for_workers(two_workers.service, 2)
    before = two_workers.scrape()
    image, labels = manifest.example_inputs(1)["image"], manifest.image.labels
    for _ in range(16):  # a new channel, so a new connection, each time
        with triton.InferenceServerClient(f"127.0.0.1:{two_workers.grpc_port}") as client:
            tensor = triton.InferInput("image", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            assert client.infer(manifest.name, [tensor]).as_numpy("class_probs").shape == (1, len(labels))
    after = two_workers.scrape()
    calls = "ensemble_grpc_requests_total"
    assert after.total(calls, code="OK") - before.total(calls, code="OK") == 16


def test_auto_measures_once_and_sigterm_drains_every_worker(model_dir: Path, tmp_path: Path) -> None:
    with service_process(
        model_dir, tmp_path, WORKERS=2, DEFAULT_MODE="auto", AUTO_BUDGET_S=2, LOG_LEVEL="info"
    ) as service:
        workers = wait_for_workers(service, 2)
        choice = readiness(service)["auto"]
        assert choice is not None
        pids = [w["pid"] for w in workers]
        service.process.terminate()
        assert service.process.wait(timeout=Settings().shutdown_grace_s + 15) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    output = service.output()
    assert output.count("auto: serving the choice another worker measured") == 1, output


def test_a_missing_model_stops_the_start_before_any_worker_with_one_line(tmp_path: Path) -> None:
    result = run_to_exit(tmp_path / "nothing-here", WORKERS=2)
    assert result.returncode == 3, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"cannot start: model directory {tmp_path / 'nothing-here'} is unusable: no manifest.json in "
        f"{tmp_path / 'nothing-here'}: build the models first (make models), or point MODEL_DIR at a directory made "
        "by `python -m model_build build` or `fuse`"
    ]


def test_a_start_up_failure_stops_every_worker_with_its_status(model_dir: Path, tmp_path: Path) -> None:
    """A failure only the workers meet (a model file altered since the manifest was written: each worker checks the
    files as it loads them) stops the group with the worker's status."""
    altered = tmp_path / "altered"
    shutil.copytree(model_dir, altered)
    member = next((altered / "members").glob("*.onnx"))
    member.write_bytes(member.read_bytes()[:-1] + b"\0")
    result = run_to_exit(altered, WORKERS=2)
    assert result.returncode == 3, result.stderr
    assert "before any served: stopping" in result.stderr


def test_auto_workers_are_the_cores_within_the_memory() -> None:
    expected = max(1, min(usable_cores().count, usable_memory().bytes // WORKER_MEMORY_BYTES))
    assert resolve_workers("auto") == expected
    assert resolve_workers(3) == 3


def test_a_replacement_that_cannot_start_is_retried_while_the_other_serves(model_dir: Path, tmp_path: Path) -> None:
    """MODEL_DIR no longer loads when a worker dies: its replacement fails, the other worker keeps serving, and the
    supervisor retries, later each time, until the directory is fixed."""
    current = tmp_path / "current"
    current.symlink_to(model_dir)
    with service_process(current, tmp_path, WORKERS=2, LOG_LEVEL="info") as service:
        workers = wait_for_workers(service, 2)
        current.unlink()
        current.symlink_to(tmp_path / "nothing-here")
        os.kill(workers[0]["pid"], signal.SIGKILL)
        # Connections the kernel queued on the killed worker's socket before it closed are reset: ask once it is gone
        deadline = time.monotonic() + WAIT_S
        while not exited(workers[0]["pid"]):
            assert time.monotonic() < deadline, "the killed worker did not exit"
            time.sleep(0.05)
        while "replacing it in 2 s" not in service.output():  # the first replacement failed: twice the delay
            assert time.monotonic() < deadline, service.output()
            with service.client() as client:
                assert client.get("/readyz").status_code == 200  # the other worker answers meanwhile
            time.sleep(0.2)
        current.unlink()
        current.symlink_to(model_dir)
        assert len(wait_for_workers(service, 2, not_pids={workers[0]["pid"]})) == 2


def exited(pid: int) -> bool:
    """Whether the process has exited (a zombie until its parent reaps it: its sockets are closed either way)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def sighup_blocked(pid: int) -> bool:
    """Whether the process blocks SIGHUP (/proc's mask): ours do from their first statement until a handler can
    apply it. Before that statement the interpreter itself is starting, which SIGHUP's default action kills, as it
    would any program."""
    (mask,) = (line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigBlk:"))
    return bool(int(mask.split()[1], 16) & (1 << (signal.SIGHUP - 1)))


@dataclass
class Hangups:
    """SIGHUP, again and again until stopped, to a process while it starts (from its first statement until its
    handler is in place) and to each of its children from the moment it exists (the supervisor starts the workers
    with SIGHUP blocked)."""

    pid: int
    signalled: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):  # the process, or a child, has just exited
                children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
                for pid in [*map(int, children), *([self.pid] if sighup_blocked(self.pid) else [])]:
                    os.kill(pid, signal.SIGHUP)
                    self.signalled.add(pid)
            time.sleep(0.01)


@pytest.mark.parametrize(
    ("workers", "control", "handled"),
    [(1, "none", "SIGHUP ignored: model control is off"), (2, "explicit", "SIGHUP: loading MODEL_DIR again")],
)
def test_sighup_while_the_processes_start_kills_none(
    model_dir: Path, manifest: Manifest, tmp_path: Path, workers: int, control: str, handled: str
) -> None:
    """SIGHUP to the process started (a lone server, or the supervisor) and to every worker, from their start until
    all serve: none dies, each handles it once it can (a reload, or a line that says it is ignored), and the service
    then serves."""
    port, log = free_port(), tmp_path / "service.log"
    environment = service_environment(model_dir, PORT=port, WORKERS=workers, MODEL_CONTROL=control, LOG_LEVEL="info")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], env=environment, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT
        )
    service = ServiceProcess(process, f"http://{LOOPBACK}:{port}", port, log)
    hangups = Hangups(process.pid)
    sender = threading.Thread(target=hangups.send)
    sender.start()
    try:
        serving = wait_for_workers(service, workers)
        hangups.stop.set()
        sender.join()
        assert {process.pid, *(w["pid"] for w in serving)} <= hangups.signalled
        deadline = time.monotonic() + WAIT_S
        while service.output().count(handled) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        assert service.output().count(handled) >= workers, service.output()  # each worker handled one at least
        with service.client() as client:
            outputs = infer_json(client, manifest.name, manifest.example_inputs(1)["image"], ["class_probs"])
            assert outputs["class_probs"]["shape"] == [1, len(manifest.image.labels)]
            assert scrape(client).value("ensemble_worker_restarts_total") == 0
        assert process.poll() is None
        assert "exited" not in service.output()
    finally:
        hangups.stop.set()
        sender.join()
        stop(process, timeout_s=30)
