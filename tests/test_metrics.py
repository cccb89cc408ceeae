from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry

from app.engine.runtime import EnsembleRuntime
from app.observability.metrics import LATENCY_BUCKETS, ServiceMetrics
from ensemble_contract.modes import Mode


def test_latency_buckets_span_1ms_to_10s_finely() -> None:
    assert LATENCY_BUCKETS[0] == 0.001
    assert LATENCY_BUCKETS[-1] == 10.0
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS)]
    assert all(1 < ratio <= 1.15 for ratio in ratios)


def test_every_served_mode_has_its_series_from_the_start(runtime: EnsembleRuntime) -> None:
    registry = CollectorRegistry()
    ServiceMetrics(registry).describe_model(runtime, {})
    assert runtime.modes == tuple(Mode)
    for mode in runtime.modes:
        assert registry.get_sample_value("ensemble_inference_seconds_count", {"mode": mode}) == 0
        for protocol in ("http", "grpc"):
            ok = {"mode": mode, "protocol": protocol, "outcome": "ok"}
            assert registry.get_sample_value("ensemble_predictions_total", ok) == 0
            assert (
                registry.get_sample_value("ensemble_request_seconds_count", {"mode": mode, "protocol": protocol}) == 0
            )


def test_two_apps_can_have_their_own_registries(runtime: EnsembleRuntime) -> None:
    first, second = ServiceMetrics(CollectorRegistry()), ServiceMetrics(CollectorRegistry())
    for metrics in (first, second):
        metrics.describe_model(runtime, {})
    first.inference_seconds.labels(Mode.FUSED).observe(0.01)
    assert first.registry.get_sample_value("ensemble_inference_seconds_count", {"mode": "fused"}) == 1
    assert second.registry.get_sample_value("ensemble_inference_seconds_count", {"mode": "fused"}) == 0
