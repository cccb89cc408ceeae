"""Batching: requests waiting for an inference slot together, whose inputs agree in all but the batch dimension,
run as one inference and each gets its own rows back, equal to what it gets alone.

The scheduler's batching on a stand-in model first (which requests merge, a failing batch, a request that gave
up, the delay); then real servers on real models: our UNets, the torchvision and scikit-learn ensembles, every
mode, every front (/predict, /v2 JSON and binary, gRPC), a batch formed for certain by holding the only slot while
the requests queue; models that must not batch; and the measurements."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.core.scheduler import Batchable, BatchingPolicy, Scheduler
from app.engine.runtime import EnsembleRuntime, Measured, Tensors
from app.engine.timing import Timing
from app.errors import InferenceTimeout
from app.settings import Settings
from bench.service import encode, free_port, picture, v2_json_body
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import Mode
from tests.onnx_members import FRAGILE_SIZE, hand_made_member
from tests.support import (
    Call,
    ClientResult,
    LiveServer,
    Outputs,
    fuse,
    grpc_call,
    holding_the_slot,
    live_server,
    predict_call,
    scrape,
    stand_in,
    v2_binary_call,
    v2_json_call,
)

# ---------------------------------------------------------------------------------------------------------------
# The scheduler's batching, on a stand-in model that doubles its input and refuses negative numbers


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Doubler:
    """Records each inference's rows; fails an inference holding a negative number."""

    runs: list[int]

    def __call__(self, feeds: Tensors) -> Measured:
        x = feeds["x"]
        self.runs.append(len(x))
        if (x < 0).any():
            raise ValueError("a negative input")
        return Measured({"y": x * 2}, Timing(inference_s=0.001, cpu_s=0.001 * len(x)))


def request(model: Doubler, *values: float, key: str = "k", max_rows: int = 8, delay_s: float = 0.0) -> Batchable:
    feeds = {"x": np.asarray(values, np.float32).reshape(-1, 1)}
    return Batchable(key, key, len(values), BatchingPolicy(max_rows, delay_s), feeds, model)


HELD = ("stand-in", 1)  # the run of `held`, which the scheduler observes like any other


@contextmanager
def held(scheduler: Scheduler) -> Iterator[Callable[[], None]]:
    """Occupies the scheduler's only slot until the returned function is called."""
    release = threading.Event()
    holder = asyncio.ensure_future(scheduler.run(stand_in(release.wait), timeout_s=30))
    try:
        yield release.set
    finally:
        release.set()
        holder.cancel()


async def queued(scheduler: Scheduler, requests: list[Batchable], timeout_s: float = 30) -> list[asyncio.Task[Any]]:
    """The requests, queued behind the held slot, in order."""
    tasks = []
    for r in requests:
        tasks.append(asyncio.ensure_future(scheduler.run(r, timeout_s)))
        await asyncio.sleep(0)
    while scheduler.waiting < len(requests):
        await asyncio.sleep(0.001)
    return tasks


@pytest.mark.anyio
async def test_requests_waiting_together_run_as_one_and_each_gets_its_own_rows() -> None:
    model, runs = Doubler([]), []
    scheduler = Scheduler(1, observe_run=lambda label, rows: runs.append((label, rows)))
    with held(scheduler) as release:
        tasks = await queued(scheduler, [request(model, 1), request(model, 2, 3), request(model, 4)])
        release()
        answers = [await task for task in tasks]
    assert model.runs == [4]  # one inference of every row
    assert [a.outputs["y"].ravel().tolist() for a in answers] == [[2], [4, 6], [8]]
    assert [a.timing.batch_rows for a in answers] == [4, 4, 4]
    assert [a.timing.cpu_s for a in answers] == pytest.approx([0.001, 0.002, 0.001])  # a share by rows
    assert runs == [HELD, ("k", 4)]
    assert scheduler.rows_per_run > 1  # the expected wait counts runs of several rows
    scheduler.close()


@pytest.mark.anyio
async def test_a_batch_takes_the_oldest_requests_of_its_key_while_their_rows_fit() -> None:
    model, runs = Doubler([]), []
    scheduler = Scheduler(1, observe_run=lambda label, rows: runs.append((label, rows)))
    with held(scheduler) as release:
        requests = [
            request(model, 1, 1, 1),
            request(model, 9, key="other"),  # another model, mode or input shape
            request(model, 2, 2, 2),
            request(model, 3, 3, 3),  # 9 rows with the first two: over 8, waits for the next run
            request(model, 4, 4),  # fits beside the first two
        ]
        tasks = await queued(scheduler, requests)
        release()
        answers = [await task for task in tasks]
    assert runs == [HELD, ("k", 8), ("other", 1), ("k", 3)]
    assert [a.timing.batch_rows for a in answers] == [8, 1, 8, 3, 8]
    assert answers[3].outputs["y"].ravel().tolist() == [6, 6, 6]
    scheduler.close()


@pytest.mark.anyio
async def test_a_batch_that_fails_runs_again_one_request_at_a_time_so_only_the_guilty_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, runs = Doubler([]), []
    scheduler = Scheduler(1, observe_run=lambda label, rows: runs.append((label, rows)))
    with held(scheduler) as release:
        tasks = await queued(scheduler, [request(model, 1), request(model, -1), request(model, 3)])
        release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r.outputs["y"].item() for r in (results[0], results[2])] == [2, 6]
    assert [r.timing.batch_rows for r in (results[0], results[2])] == [1, 1]
    assert isinstance(results[1], ValueError)
    assert model.runs == [3, 1, 1, 1]  # the batch, then each alone
    assert runs == [HELD, *[("k", 1)] * 3]
    assert "a batch of 3 requests failed: running them one by one" in caplog.text
    scheduler.close()


@pytest.mark.anyio
async def test_a_request_that_gave_up_waiting_is_left_out_of_the_batch() -> None:
    model = Doubler([])
    scheduler = Scheduler(1)
    with held(scheduler) as release:
        [first] = await queued(scheduler, [request(model, 1)])
        impatient = asyncio.ensure_future(scheduler.run(request(model, 5), timeout_s=0.05))
        with pytest.raises(InferenceTimeout, match="no inference slot"):
            await impatient
        [last] = await queued(scheduler, [request(model, 3)])
        release()
        answers = [await first, await last]
    assert model.runs == [2] and [a.timing.batch_rows for a in answers] == [2, 2]
    scheduler.close()


@pytest.mark.anyio
async def test_with_a_delay_a_free_slot_waits_for_a_full_batch_and_without_one_it_takes_what_waits() -> None:
    model = Doubler([])
    patient = Scheduler(1)
    first = asyncio.ensure_future(patient.run(request(model, 1, max_rows=2, delay_s=30), 30))
    await asyncio.sleep(0.05)
    second = await patient.run(request(model, 2, max_rows=2, delay_s=30), 30)  # fills the batch: it runs at once
    waited = await first
    assert model.runs == [2] and waited.timing.batch_rows == second.timing.batch_rows == 2
    # The first waited for the second (not the whole delay: the batch filled).
    assert waited.timing.batch_wait_s >= 0.05
    patient.close()

    eager = Scheduler(1)  # BATCHING_DELAY_MS=0: a lone request never waits for company
    alone = await eager.run(request(model, 1), 30)
    assert alone.timing.batch_rows == 1 and alone.timing.batch_wait_s < 0.05
    eager.close()


# ---------------------------------------------------------------------------------------------------------------
# Real servers: one inference slot, so that holding it makes the requests queue and batch for certain.


def batching_settings(model_dir: Path, **overrides: Any) -> Settings:
    return Settings(**{"inference_slots": 1, "max_queue": 32, "batching_max_rows": 8} | overrides, model_dir=model_dir)


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[LiveServer, str]]:
    """A live server with gRPC, and its gRPC address."""
    port = free_port()
    with live_server(settings.model_copy(update={"grpc_port": port})) as live:
        yield live, f"127.0.0.1:{port}"


def together(server: LiveServer, calls: list[Call]) -> list[ClientResult]:
    """The calls, made at once while the server's only slot is held, so that they all wait for it; answered
    once it is released."""
    with ThreadPoolExecutor(len(calls)) as pool:
        with holding_the_slot(server, with_ticket=False):
            futures = [pool.submit(call) for call in calls]
            deadline = time.monotonic() + 60
            while server.dataplane.scheduler.waiting < len(calls):
                assert time.monotonic() < deadline, "the requests did not all queue"
                time.sleep(0.005)
        return [future.result() for future in futures]


def assert_same_answers(batched: Outputs, alone: Outputs, label: str) -> None:
    """Batched equals alone: floats within 1e-5 of the output's scale, integers and votes exactly."""
    assert batched.keys() == alone.keys(), label
    for name, expected in alone.items():
        got = batched[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, f"{label} {name}"
        if expected.dtype.kind == "f":
            scale = float(np.abs(expected).max(initial=0))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{label} {name}")
        else:
            np.testing.assert_array_equal(got, expected, err_msg=f"{label} {name}")


def rows(manifest: Manifest, count: int, seed: int) -> Tensors:
    return manifest.example_inputs(count, seed=seed)


def check_batched_against_alone(server: LiveServer, calls: list[Call], label: str) -> list[ClientResult]:
    """The calls batched together, then each alone: the same answers; the batch as large as their rows."""
    batched = together(server, calls)
    for i, (call, answer) in enumerate(zip(calls, batched, strict=True)):
        alone = call()
        assert alone.batch_rows == call.rows  # it ran by itself
        assert_same_answers(answer.outputs, alone.outputs, f"{label} call {i}")
    return batched


@pytest.fixture(scope="module")
def ours(model_dir: Path) -> Iterator[tuple[LiveServer, str]]:
    with serving(batching_settings(model_dir)) as served:
        yield served


@pytest.mark.parametrize("mode", list(Mode))
def test_our_models_answer_the_same_batched_over_every_front_in_every_mode(
    ours: tuple[LiveServer, str], manifest: Manifest, mode: Mode
) -> None:
    """One batch of requests from every front (the same model, mode and image size): each gets its own rows,
    members' outputs included, equal to its answer alone."""
    server, address = ours
    name, members = manifest.name, [c.members_output for c in manifest.combine if c.members_output]
    calls = [
        v2_json_call(server.url, name, rows(manifest, 1, seed=1), mode),
        v2_json_call(server.url, name, rows(manifest, 2, seed=2), mode, outputs=members),
        v2_binary_call(server.url, name, rows(manifest, 1, seed=3), mode),
        grpc_call(address, name, rows(manifest, 1, seed=4), mode),
        predict_call(server.url, encode(picture(seed=5), "PNG"), mode),
        predict_call(server.url, encode(picture(seed=6), "PNG"), mode),
    ]
    batched = check_batched_against_alone(server, calls, str(mode))
    assert {answer.batch_rows for answer in batched} == {7}  # every row of the six requests in one inference


def test_requests_of_different_modes_or_sizes_never_share_a_batch(
    ours: tuple[LiveServer, str], manifest: Manifest
) -> None:
    server, _ = ours
    calls = [
        v2_json_call(server.url, manifest.name, rows(manifest, 1, seed=1), Mode.FUSED),
        v2_json_call(server.url, manifest.name, rows(manifest, 1, seed=2), Mode.PARALLEL),
        v2_json_call(server.url, manifest.name, rows(manifest, 1, seed=3), Mode.FUSED),
    ]
    assert [answer.batch_rows for answer in together(server, calls)] == [2, 1, 2]


def test_batch_sizes_and_waits_are_measured(ours: tuple[LiveServer, str], manifest: Manifest) -> None:
    server, _ = ours
    with server.client() as client:
        before = scrape(client)
        together(
            server, [v2_json_call(server.url, manifest.name, rows(manifest, 1, s), Mode.SEQUENTIAL) for s in range(3)]
        )
        after = scrape(client)
        stats = client.get("/stats").json()
    labels = {"mode": "sequential"}
    assert after.value("ensemble_batch_rows_count", **labels) - before.value("ensemble_batch_rows_count", **labels) == 1
    assert after.value("ensemble_batch_rows_sum", **labels) - before.value("ensemble_batch_rows_sum", **labels) == 3
    waits = "ensemble_queue_seconds_count"
    assert after.value(waits, **labels) - before.value(waits, **labels) == 3
    assert stats["batching"] == {"max_rows": 8, "delay_ms": 0.0, "off_because": None}
    assert stats["modes"]["sequential"]["mean_batch_rows"] > 1
    assert stats["modes"]["sequential"]["queue_ms"]["p50"] > 0


def test_answers_stay_right_under_free_running_concurrent_load(
    model_dir: Path, manifest: Manifest, runtime: EnsembleRuntime
) -> None:
    """16 clients sending distinct images as fast as answers come, on two slots: whatever batches form, every
    answer equals the model's on that image alone (in-process, unbatched)."""
    feeds = [rows(manifest, 1, seed=100 + i) for i in range(64)]
    expected = [runtime.infer(f, Mode.FUSED) for f in feeds]
    settings = batching_settings(model_dir, inference_slots=2, max_queue=64)
    with serving(settings) as (server, _), ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda f: v2_json_call(server.url, manifest.name, f, Mode.FUSED)(), feeds))
        with server.client() as client:
            metrics = scrape(client)
    for i, (answer, alone) in enumerate(zip(answers, expected, strict=True)):
        assert_same_answers(answer.outputs, alone, f"request {i}")
    runs = metrics.value("ensemble_batch_rows_count", mode="fused")
    assert metrics.value("ensemble_batch_rows_sum", mode="fused") == 64 and 1 <= runs <= 64


# Third-party ensembles: torchvision classifiers (dynamic spatial dims) and scikit-learn (ai.onnx.ml, int64 votes).


@pytest.mark.parametrize("kind", ["vision", "tabular"])
def test_third_party_ensembles_answer_the_same_batched_in_every_mode(kind: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(f"{kind}_dir")
    manifest = load_manifest(model_dir)
    with serving(batching_settings(model_dir)) as (server, address):
        assert server.dataplane.model.runtime.unbatchable is None
        for mode in server.dataplane.model.runtime.modes:
            calls = [
                v2_json_call(server.url, manifest.name, rows(manifest, 1, seed=1), mode),
                v2_json_call(server.url, manifest.name, rows(manifest, 3, seed=2), mode),
                v2_binary_call(server.url, manifest.name, rows(manifest, 1, seed=3), mode),
                grpc_call(address, manifest.name, rows(manifest, 2, seed=4), mode),
            ]
            batched = check_batched_against_alone(server, calls, f"{kind} {mode}")
            assert {answer.batch_rows for answer in batched} == {7}


def test_vision_images_of_other_sizes_batch_apart(vision_dir: Path) -> None:
    manifest = load_manifest(vision_dir)
    sized = [np.random.default_rng(s).normal(size=(1, 3, h, 64)).astype(np.float32) for s, h in enumerate((64, 96, 64))]
    with serving(batching_settings(vision_dir)) as (server, _):
        calls = [v2_json_call(server.url, manifest.name, {"input": x}, Mode.FUSED) for x in sized]
        assert [answer.batch_rows for answer in check_batched_against_alone(server, calls, "sizes")] == [2, 1, 2]


# What never poisons a batch: a request that fails validation, and one that fails inside ONNX Runtime.


def test_a_request_failing_validation_is_refused_at_once_and_never_joins_a_batch(
    ours: tuple[LiveServer, str], manifest: Manifest
) -> None:
    server, _ = ours
    wrong = {"image": np.zeros((1, 3, 5, 5), np.float32)}
    with ThreadPoolExecutor(2) as pool:
        with holding_the_slot(server, with_ticket=False):
            calls = [v2_json_call(server.url, manifest.name, rows(manifest, 1, seed=s), Mode.FUSED) for s in (1, 2)]
            good = [pool.submit(call) for call in calls]
            with server.client() as client:  # answered while the slot is still held: it never waited for it
                refused = client.post(f"/v2/models/{manifest.name}/infer", json=v2_json_body(wrong))
            assert refused.status_code == 400 and "image" in refused.json()["error"]
            while server.dataplane.scheduler.waiting < len(good):
                time.sleep(0.005)
        assert [future.result().batch_rows for future in good] == [2, 2]


def test_a_batch_failing_inside_onnx_runtime_fails_only_the_guilty_request(fragile_dir: Path) -> None:
    manifest = load_manifest(fragile_dir)
    fine = [np.random.default_rng(s).random((1, 3, FRAGILE_SIZE, FRAGILE_SIZE), np.float32) for s in range(3)]
    guilty = np.full((1, 3, FRAGILE_SIZE, FRAGILE_SIZE), 1000.0, np.float32)  # out of the lookup table
    with serving(batching_settings(fragile_dir)) as (server, _):

        def fails() -> ClientResult:
            response = httpx.post(f"{server.url}/v2/models/{manifest.name}/infer", json=v2_json_body({"image": guilty}))
            assert response.status_code == 500 and "inference failed" in response.json()["error"]
            return ClientResult({}, 0)

        calls = [v2_json_call(server.url, manifest.name, {"image": x}, Mode.FUSED) for x in fine]
        answers = together(server, [calls[0], Call(1, fails), calls[1], calls[2]])
        assert [answer.batch_rows for answer in answers] == [1, 0, 1, 1]  # the batch failed: each ran alone
        for call, answer in zip(calls, (answers[0], answers[2], answers[3]), strict=True):
            assert_same_answers(answer.outputs, call().outputs, "after the failed batch")


# Models that must not batch: a fixed batch dimension, and rows that depend on each other.


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"batch": 1}, "the batch dimension of image, class_probs"),
        ({"mix_rows": True}, "in fused mode, the rows of class_probs depend on the other rows of the batch"),
    ],
    ids=["fixed-batch", "rows-depend-on-each-other"],
)
def test_models_whose_rows_cannot_stack_are_never_batched_and_say_why(
    tmp_path: Path, options: dict[str, Any], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    members = [hand_made_member(tmp_path / f"m{i}.onnx", 8, 3, i, **options) for i in range(2)]
    result = fuse(*members, "--out", tmp_path / "model", "--labels", "a,b,c")
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="app"), serving(batching_settings(tmp_path / "model")) as (server, _):
        assert f"batching off: {why}" in caplog.text
        feeds = [rows(manifest, 1, seed=s) for s in range(3)]
        calls = [v2_json_call(server.url, manifest.name, f, Mode.FUSED) for f in feeds]
        assert [answer.batch_rows for answer in together(server, calls)] == [1, 1, 1]
        with server.client() as client:
            assert client.get("/stats").json()["batching"]["off_because"].startswith(why)


@pytest.mark.anyio
async def test_a_run_known_to_be_shorter_than_a_thread_hand_off_runs_on_the_event_loop() -> None:
    threads: list[str] = []

    def where(feeds: Tensors) -> Measured:
        threads.append(threading.current_thread().name)
        return Measured({"y": feeds["x"]}, Timing(inference_s=0.0, cpu_s=0.0))

    def work() -> Batchable:
        return Batchable("k", "k", 1, BatchingPolicy(1), {"x": np.zeros((1, 1), np.float32)}, where)

    loop_thread = threading.current_thread().name
    inline, threaded = Scheduler(1, inline_below_s=60), Scheduler(1)
    for scheduler in (inline, threaded):
        for _ in range(3):
            await scheduler.run(work(), timeout_s=30)
        scheduler.close()
    # The first run of a label is not known to be short: it goes to an inference thread, the next ones run inline.
    assert threads[0].startswith("inference") and threads[1:3] == [loop_thread, loop_thread]
    assert all(name.startswith("inference") for name in threads[3:])  # INLINE_INFERENCE_MS=0: never inline
