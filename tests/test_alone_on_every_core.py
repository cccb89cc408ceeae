"""ALONE_ON_EVERY_CORE: an inference that starts while no other runs anywhere in the worker group runs on sessions
sized for every core; beside others, on its worker's and slot's share. The group's load as the workers share it,
then a real server whose layout (two slots of one thread) differs from every core's (one slot of two)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from app.engine.resources import usable_cores
from app.settings import Settings
from app.workers import LoadCell, WorkerGroup
from ensemble_contract.manifest import Manifest
from tests.support import LiveServer, infer_json, live_server, scrape


def test_each_worker_sees_the_inferences_every_worker_runs() -> None:
    supervisor = WorkerGroup.supervising(2)
    assert supervisor.directory is not None
    first, second = (WorkerGroup(2, supervisor.directory, index) for index in (0, 1))
    try:
        with first.load.running() as alone:
            assert alone
            with second.load.running() as alone_too:
                assert not alone_too
                assert supervisor.load.running_now() == 2
        assert supervisor.load.running_now() == 0
        assert (supervisor.load.ran(LoadCell.ALONE), supervisor.load.ran(LoadCell.SHARED)) == (1, 1)
        with ExitStack() as stack:
            stack.enter_context(second.load.running())  # its worker dies in the middle of an inference
            replacement = WorkerGroup(2, supervisor.directory, 1)
            assert replacement.load.running_now() == 0  # the replacement takes over the row: nothing of its runs
    finally:
        supervisor.remove()


needs_two_cores = pytest.mark.skipif(usable_cores().count < 2, reason="needs 2 usable cores to differ from a share")


@pytest.fixture(scope="module")
def two_slots(model_dir: Path) -> Iterator[LiveServer]:
    with live_server(Settings(model_dir=model_dir, inference_slots=2)) as server:
        yield server


@needs_two_cores
def test_a_lone_inference_runs_on_every_core_and_one_beside_others_on_its_share(
    two_slots: LiveServer, manifest: Manifest
) -> None:
    cores = usable_cores().count
    batch = manifest.example_inputs(1)["image"]
    with two_slots.client() as client:
        sessions = client.get("/readyz").json()["sessions"]
        assert sessions["alone_on_every_core"] and f"all {cores} cores" in sessions["why"]
        assert sessions["shared"]["fused"].startswith("onnxruntime intra_op=1 ")
        assert sessions["alone"]["fused"].startswith(f"onnxruntime intra_op={cores} ")
        alone = infer_json(client, manifest.name, batch, mode="fused")
        model = two_slots.dataplane.model
        assert model is not None
        with model.load.running():  # another inference runs in the group meanwhile (itself alone, and counted)
            shared = infer_json(client, manifest.name, batch, mode="fused")
        stats = client.get("/stats").json()["sessions"]
        assert (stats["runs_alone"], stats["runs_shared"], stats["running_now"]) == (2, 1, 0)
        metrics = scrape(client)
        assert metrics.value("ensemble_inference_runs_total", sessions="alone") == 2
        assert metrics.value("ensemble_inference_runs_total", sessions="shared") == 1
    for name, output in alone.items():  # the same model on other threads: the same answer
        np.testing.assert_allclose(output["data"], shared[name]["data"], rtol=1e-4, atol=1e-5)


def test_without_it_every_inference_runs_on_its_share(model_dir: Path) -> None:
    settings = Settings(model_dir=model_dir, inference_slots=2, alone_on_every_core=False)
    with live_server(settings) as server, server.client() as client:
        sessions = client.get("/readyz").json()["sessions"]
    assert not sessions["alone_on_every_core"] and sessions["alone"] is None
    assert sessions["why"].startswith("ALONE_ON_EVERY_CORE=false")
