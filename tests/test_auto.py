"""DEFAULT_MODE=auto: the layouts it tries, its ranking rule, and its choice on a real server (functional: which
candidate wins depends on the machine, so the test checks the choice follows the rule on the figures measured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.auto import CandidateFigures, SlotLayout, batching_options, choose, layouts, rank
from app.core.model import runtime_options
from app.engine.resources import usable_cores
from app.settings import Settings
from bench.service import png_bytes
from ensemble_contract.modes import Mode
from tests.support import LiveServer, live_server, scrape


def test_layouts_divide_the_cores_between_slots() -> None:
    assert layouts(1) == [SlotLayout(1, 1)]
    assert layouts(2) == [SlotLayout(1, 2), SlotLayout(2, 1)]
    assert layouts(6) == [SlotLayout(1, 6), SlotLayout(2, 3), SlotLayout(4, 1), SlotLayout(6, 1)]
    assert [str(layout) for layout in layouts(16)] == ["1x16", "2x8", "4x4", "8x2", "16x1"]
    assert all(layout.slots * layout.threads <= 16 for layout in layouts(16))


def test_batching_is_timed_off_and_at_a_few_sizes_up_to_the_maximum() -> None:
    assert batching_options(1) == [1]
    assert batching_options(2) == [1, 2]
    assert batching_options(8) == [1, 4, 8]
    assert batching_options(64) == [1, 4, 8, 16]


def figures(mode: Mode, layout: str, throughput: float, p50: float, p99: float, within: bool) -> CandidateFigures:
    return CandidateFigures(
        mode=mode, layout=layout, batching_rows=1, throughput_per_s=throughput,
        throughput_ci95=(throughput - 1, throughput + 1), p50_ms=p50, p99_ms=p99, mean_batch_rows=1, windows=3,
        stable=True, within_budget=within,
    )  # fmt: skip


def test_the_fastest_within_the_budget_wins_and_equal_throughput_goes_to_the_lower_p50() -> None:
    fast_but_late = figures(Mode.PARALLEL, "2x1", 200, 5, 900, within=False)
    best = figures(Mode.FUSED_INT8, "2x1", 150, 9, 20, within=True)
    as_fast_lower_p50 = figures(Mode.FUSED, "1x2", 148, 7, 15, within=True)
    slower = figures(Mode.SEQUENTIAL, "1x2", 100, 10, 20, within=True)
    ranked = rank([fast_but_late, slower, best, as_fast_lower_p50])
    assert ranked == [as_fast_lower_p50, best, slower, fast_but_late]
    assert rank([fast_but_late, figures(Mode.FUSED, "1x2", 50, 20, 800, within=False)])[0].p99_ms == 800


@pytest.fixture(scope="module")
def auto_server(model_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(model_dir=model_dir, default_mode="auto", auto_budget_s=6, auto_window_ms=40)
    with live_server(settings) as live:
        yield live


def test_auto_times_every_mode_under_every_layout_and_batching_and_serves_its_choice(
    auto_server: LiveServer,
) -> None:
    with auto_server.client() as client:
        auto = client.get("/readyz").json()["auto"]
        candidates = auto["candidates"]
        expected = {
            (mode.value, str(layout), rows)
            for mode in Mode
            for layout in layouts(usable_cores().count)
            for rows in batching_options(Settings.model_fields["batching_max_rows"].default)
        }
        assert {(c["mode"], c["layout"], c["batching_rows"]) for c in candidates} == expected
        assert all(c["windows"] >= 1 and c["throughput_per_s"] > 0 for c in candidates)
        # Without batching every inference ran one request; with it, the callers (slots x rows) filled batches.
        assert all(c["mean_batch_rows"] == 1 for c in candidates if c["batching_rows"] == 1)
        assert all(1 < c["mean_batch_rows"] <= c["batching_rows"] for c in candidates if c["batching_rows"] > 1)
        assert [CandidateFigures(**c) for c in candidates] == rank([CandidateFigures(**c) for c in candidates])
        best = candidates[0]
        assert (auto["mode"], auto["layout"], auto["batching_rows"]) == (
            best["mode"], best["layout"], best["batching_rows"]
        )  # fmt: skip
        assert auto["slots"] * auto["threads"] <= usable_cores().count
        assert auto_server.dataplane.scheduler.slots == auto["slots"]
        assert auto_server.dataplane.model.runtime.slots == auto["slots"]
        assert auto_server.dataplane.model.batching.max_rows == auto["batching_rows"]
        # Requests without a mode, and ?mode=auto, run the chosen mode.
        for params in ({}, {"mode": "auto"}):
            response = client.post(
                "/predict", params=params, content=png_bytes(), headers={"content-type": "image/png"}
            )
            assert response.status_code == 200 and response.json()["mode"] == auto["mode"]
        metrics = scrape(client)
        for c in candidates:
            labels = {"mode": c["mode"], "layout": c["layout"], "batching_rows": str(c["batching_rows"])}
            assert metrics.value("ensemble_auto_choice", **labels) == (1.0 if c is best else 0.0)
        assert client.get("/stats").json()["auto"] == auto


def test_mode_auto_needs_the_start_up_measurement(client) -> None:
    response = client.post(
        "/predict", params={"mode": "auto"}, content=png_bytes(), headers={"content-type": "image/png"}
    )
    assert response.status_code == 422
    assert "DEFAULT_MODE=auto" in response.json()["error"]["message"]


def test_a_budget_too_small_still_times_every_candidate_once(model_dir: Path) -> None:
    settings = Settings(
        model_dir=model_dir, default_mode="auto", auto_budget_s=0.001, auto_window_ms=10, batching_max_rows=4
    )
    runtime, auto = choose(settings, runtime_options(settings))
    try:
        assert len(auto.candidates) == len(Mode) * len(layouts(usable_cores().count)) * len([1, 4])
        assert all(c.windows == 1 and c.throughput_ci95 == (None, None) for c in auto.candidates)
        assert runtime.slots == auto.slots and auto.threads == runtime.plans[auto.mode].intra_op_threads
    finally:
        runtime.close()
