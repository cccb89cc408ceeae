from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from app.engine.timing import Timing
from app.observability.stats import MAX_SAMPLES_PER_MODE, RecentLatencies
from app.workers import WorkerGroup
from ensemble_contract.modes import Mode


def test_percentiles_per_mode() -> None:
    recent = RecentLatencies(window_s=60, modes=list(Mode))
    for ms in range(1, 101):
        recent.record(
            Mode.PARALLEL,
            Timing(
                request_s=ms / 1000,
                queue_s=ms / 10_000,
                inference_s=ms / 2000,
                cpu_s=ms / 4000,
                batch_rows=1 + ms % 4,  # 1, 2, 3, 4 in turn: 2.5 on average
            ),
        )
    summary = recent.summary()
    assert summary[Mode.PARALLEL].requests == 100
    assert summary[Mode.PARALLEL].request_ms.p50_ms == pytest.approx(50.5)
    assert summary[Mode.PARALLEL].request_ms.p95_ms == pytest.approx(95.05)
    assert summary[Mode.PARALLEL].inference_ms.p50_ms == pytest.approx(25.25)
    assert summary[Mode.PARALLEL].queue_ms.p50_ms == pytest.approx(5.05)
    assert summary[Mode.PARALLEL].mean_batch_rows == 2.5
    assert summary[Mode.FUSED].mean_batch_rows is None
    assert summary[Mode.PARALLEL].cpu_s == pytest.approx(sum(range(1, 101)) / 4000)
    assert summary[Mode.PARALLEL].predictions_per_cpu_second == pytest.approx(100 / (5050 / 4000), rel=1e-3)
    assert summary[Mode.FUSED].predictions_per_cpu_second is None
    assert summary[Mode.FUSED].requests == 0
    assert summary[Mode.FUSED].request_ms.p50_ms is None


SAMPLE = Timing(request_s=0.01, queue_s=0.001, inference_s=0.005, cpu_s=0.004, batch_rows=1)


def test_samples_leave_the_window_and_memory_is_bounded() -> None:
    recent = RecentLatencies(window_s=1e-9, modes=list(Mode))
    recent.record(Mode.FUSED, SAMPLE)
    assert recent.summary()[Mode.FUSED].requests == 0
    bounded = RecentLatencies(window_s=60, modes=list(Mode))
    for _ in range(MAX_SAMPLES_PER_MODE + 10):
        bounded.record(Mode.FUSED, SAMPLE)
    assert bounded.summary()[Mode.FUSED].requests == MAX_SAMPLES_PER_MODE


def test_a_worker_summarises_every_workers_requests(tmp_path: Path) -> None:
    """Two workers sharing a directory: either one's summary holds both one's samples (their percentiles together,
    not an average of each worker's)."""
    first, second = WorkerGroup(2, tmp_path, index=0), WorkerGroup(2, tmp_path, index=1)
    for workers in (first, second):
        workers.publish()
    recent = [RecentLatencies(window_s=60, modes=[Mode.FUSED], workers=w) for w in (first, second)]
    for ms in range(1, 51):
        recent[0].record(Mode.FUSED, replace(SAMPLE, request_s=ms / 1000))
        recent[1].record(Mode.FUSED, replace(SAMPLE, request_s=(50 + ms) / 1000))
    for either in recent:
        summary = either.summary()[Mode.FUSED]
        assert summary.requests == 100
        assert summary.request_ms.p50_ms == pytest.approx(50.5)
    (tmp_path / "status-1.json").unlink()  # a worker that is gone no longer counts
    assert recent[0].summary()[Mode.FUSED].requests == 50
