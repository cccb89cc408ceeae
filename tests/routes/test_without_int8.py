"""A model directory without the int8 graph (the build drops it when it costs accuracy): the other modes are
served, fused-int8 is refused with a clear client error, and compare, /readyz, /stats and /metrics leave it out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.settings import Settings
from bench.service import png_bytes
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from tests.support import copy_without_int8, infer_body, live_server, scrape

FP32_MODES = [mode.value for mode in Mode if mode is not Mode.FUSED_INT8]
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def fp32_only(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    models = copy_without_int8(model_dir, tmp_path_factory.mktemp("fp32-only") / "models")
    with live_server(Settings(model_dir=models)) as live, live.client() as client:
        yield client


def test_fused_int8_is_refused_with_the_reason(fp32_only: httpx.Client, manifest: Manifest) -> None:
    response = fp32_only.post("/predict", params={"mode": "fused-int8"}, content=png_bytes(), headers=PNG)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_parameter"
    assert "no int8 ensemble" in response.json()["error"]["message"]
    batch = np.zeros((1, 3, manifest.image.height, manifest.image.width), np.float32)
    v2 = fp32_only.post(f"/v2/models/{manifest.name}/infer", json=infer_body(batch, mode="fused-int8"))
    assert v2.status_code == 400
    assert "no int8 ensemble" in v2.json()["error"]


def test_the_fp32_modes_are_served_and_listed(fp32_only: httpx.Client) -> None:
    assert fp32_only.get("/readyz").json()["modes"] == FP32_MODES
    picks = [
        fp32_only.post("/predict", params={"mode": "compare"}, content=png_bytes(), headers=PNG).json()["mode"]
        for _ in FP32_MODES
    ]
    assert sorted(picks) == sorted(FP32_MODES)
    assert list(fp32_only.get("/stats").json()["modes"]) == FP32_MODES
    labelled = [dict(labels) for _, labels in scrape(fp32_only).samples]
    modes_in_metrics = {labels["mode"] for labels in labelled if "mode" in labels}
    assert modes_in_metrics == set(FP32_MODES)
