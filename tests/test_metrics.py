from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry

from app.metrics import LATENCY_BUCKETS, Metrics
from app.modes import Mode


def test_latency_buckets_span_1ms_to_10s_finely() -> None:
    assert LATENCY_BUCKETS[0] == 0.001
    assert LATENCY_BUCKETS[-1] == 10.0
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_BUCKETS)]
    assert all(1 < ratio <= 1.15 for ratio in ratios)


def test_every_mode_has_its_series_from_the_start() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    for mode in Mode:
        assert registry.get_sample_value("ensemble_inference_seconds_count", {"mode": mode}) == 0
        assert registry.get_sample_value("ensemble_predictions_total", {"mode": mode, "outcome": "ok"}) == 0


def test_two_apps_can_have_their_own_registries() -> None:
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.inference_seconds.labels(Mode.FUSED).observe(0.01)
    assert second.registry.get_sample_value("ensemble_inference_seconds_count", {"mode": "fused"}) == 0
