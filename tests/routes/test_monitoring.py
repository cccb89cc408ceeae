"""/metrics changes per mode as requests arrive; /stats summarizes recent latencies per mode."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from app.engine.resources import usable_cores
from app.settings import Settings
from bench.service import png_bytes
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from tests.support import infer_json, live_server, scrape


def predict(client: httpx.Client, mode: Mode) -> None:
    response = client.post(
        "/predict", content=png_bytes(), headers={"Content-Type": "image/png"}, params={"mode": mode.value}
    )
    assert response.status_code == 200


def test_each_request_counts_for_its_own_mode_only(client: httpx.Client, manifest: Manifest) -> None:
    per_mode = {"ensemble_inference_seconds_count": {}, "ensemble_request_seconds_count": {"protocol": "http"}}
    for mode in Mode:
        before = scrape(client)
        predict(client, mode)
        after = scrape(client)
        for other in Mode:
            grew = 1.0 if other is mode else 0.0
            for name, labels in per_mode.items():
                grown = after.value(name, mode=other, **labels) - before.value(name, mode=other, **labels)
                assert grown == grew, (name, other)
            ok = {"mode": other, "protocol": "http", "outcome": "ok"}
            assert (
                after.value("ensemble_predictions_total", **ok) - before.value("ensemble_predictions_total", **ok)
                == grew
            )
        assert after.value("ensemble_inference_seconds_sum", mode=mode) > before.value(
            "ensemble_inference_seconds_sum", mode=mode
        )
        assert after.value("ensemble_decode_seconds_count") == before.value("ensemble_decode_seconds_count") + 1
        assert after.value("ensemble_preprocess_seconds_count") == before.value("ensemble_preprocess_seconds_count") + 1


def test_tensor_requests_count_too(client: httpx.Client, manifest: Manifest) -> None:
    spec = manifest.image
    batch = np.zeros((1, 3, spec.height, spec.width), dtype=np.float32)
    before = scrape(client)
    infer_json(client, manifest.name, batch, outputs=["class_probs"], mode="parallel")
    after = scrape(client)
    name = "ensemble_queue_seconds_count"
    assert after.value(name, mode="parallel") == before.value(name, mode="parallel") + 1
    route = {"route": "/v2/models/{model_name}/infer", "method": "POST", "status": "2xx"}
    assert (
        after.value("ensemble_http_requests_total", **route)
        == before.value("ensemble_http_requests_total", **route) + 1
    )


def test_requests_by_route_template_and_status_class(client: httpx.Client) -> None:
    before = scrape(client)
    client.get("/no/such/page")
    client.post("/predict", content=b"junk", headers={"Content-Type": "image/png"})
    after = scrape(client)
    for labels in (
        {"route": "unmatched", "method": "GET", "status": "4xx"},
        {"route": "/predict", "method": "POST", "status": "4xx"},
    ):
        name = "ensemble_http_requests_total"
        assert after.value(name, **labels) == before.value(name, **labels) + 1
    assert not any("/no/such/page" in str(labels) for _, labels in after.samples)
    assert after.value("ensemble_http_requests_in_flight") == 1  # the scrape itself


def test_model_info(client: httpx.Client, manifest: Manifest) -> None:
    labels = next(dict(labels) for name, labels in scrape(client).samples if name == "ensemble_model_info")
    assert labels["name"] == manifest.name
    assert labels["sha256"] == manifest.ensemble.sha256
    assert labels["members"] == ",".join(member.name for member in manifest.members)
    assert f"spinning={Settings().spinning}" in labels["parallel_session"]
    assert labels["inference_slots"] == "1"
    assert labels["fused_engine"] == "onnxruntime"  # ENGINE unset, DEFAULT_MODE fixed


def test_stats_per_mode(client: httpx.Client) -> None:
    before = client.get("/stats").json()
    predict(client, Mode.SEQUENTIAL)
    stats = client.get("/stats").json()
    assert stats["window_s"] == 60
    assert set(stats["modes"]) == {mode.value for mode in Mode}
    sequential = stats["modes"]["sequential"]
    assert sequential["requests"] == before["modes"]["sequential"]["requests"] + 1
    for latency in (sequential["request_ms"], sequential["inference_ms"]):
        assert 0 < latency["p50"] <= latency["p95"]


def test_each_prediction_is_charged_its_cpu_time(client: httpx.Client) -> None:
    for mode in Mode:
        before = scrape(client)
        predict(client, mode)
        after = scrape(client)
        count = "ensemble_cpu_seconds_count"
        assert after.value(count, mode=mode) == before.value(count, mode=mode) + 1
        charged = after.value("ensemble_cpu_seconds_sum", mode=mode) - before.value(
            "ensemble_cpu_seconds_sum", mode=mode
        )
        assert 0 < charged < 5, (mode, charged)
    stats = client.get("/stats").json()
    assert stats["cost_per_hour"] is None and stats["cores"] == usable_cores().count
    for mode in Mode:
        entry = stats["modes"][mode.value]
        assert entry["cpu_ms_per_prediction"] > 0
        assert entry["predictions_per_cpu_second"] == pytest.approx(1000 / entry["cpu_ms_per_prediction"], rel=1e-2)
        assert entry["cost_per_million_predictions"] is None


def test_cost_per_million_predictions_follows_the_hourly_price(model_dir: Path) -> None:
    with live_server(Settings(model_dir=model_dir, cost_per_hour=0.36)) as server, server.client() as client:
        predict(client, Mode.FUSED)
        stats = client.get("/stats").json()
        fused = stats["modes"]["fused"]
        hourly = fused["predictions_per_cpu_second"] * stats["cores"] * 3600
        assert fused["cost_per_million_predictions"] == pytest.approx(0.36 / hourly * 1e6, rel=1e-3)
        assert stats["modes"]["sequential"]["cost_per_million_predictions"] is None  # no request yet
