from __future__ import annotations

from collections import Counter

from app.modes import Mode, ModeChoice, ModeSelector


def test_a_mode_is_taken_as_asked_and_the_default_fills_in() -> None:
    selector = ModeSelector(ModeChoice.SEQUENTIAL)
    assert selector.pick() is Mode.SEQUENTIAL
    assert selector.pick(ModeChoice.PARALLEL) is Mode.PARALLEL


def test_compare_spreads_requests_evenly_over_the_modes() -> None:
    selector = ModeSelector(ModeChoice.COMPARE)
    picks = [selector.pick() for _ in range(30)]
    assert Counter(picks) == {mode: 10 for mode in Mode}
    assert set(picks[:3]) == set(Mode)
