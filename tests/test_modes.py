from __future__ import annotations

from collections import Counter

import pytest

from app.engine.selector import ModeSelector
from app.errors import InvalidParameter, StartupError
from ensemble_contract.modes import Mode, ModeChoice

WITHOUT_INT8 = (Mode.FUSED, Mode.SEQUENTIAL, Mode.PARALLEL)


def test_a_mode_is_taken_as_asked_and_the_default_fills_in() -> None:
    selector = ModeSelector(ModeChoice.SEQUENTIAL, list(Mode))
    assert selector.pick() is Mode.SEQUENTIAL
    assert selector.pick(ModeChoice.PARALLEL) is Mode.PARALLEL
    assert selector.pick(ModeChoice.FUSED_INT8) is Mode.FUSED_INT8


@pytest.mark.parametrize("served", [tuple(Mode), WITHOUT_INT8], ids=["with-int8", "without-int8"])
def test_compare_spreads_requests_evenly_over_the_modes_served(served: tuple[Mode, ...]) -> None:
    selector = ModeSelector(ModeChoice.COMPARE, served)
    picks = [selector.pick() for _ in range(10 * len(served))]
    assert Counter(picks) == {mode: 10 for mode in served}
    assert set(picks[: len(served)]) == set(served)


def test_a_mode_not_served_is_refused_with_the_reason() -> None:
    selector = ModeSelector(ModeChoice.FUSED, WITHOUT_INT8)
    with pytest.raises(InvalidParameter, match=r"fused-int8 is not served here .* no int8 ensemble"):
        selector.pick(ModeChoice.FUSED_INT8)
    assert selector.pick() is Mode.FUSED


def test_a_default_mode_not_served_stops_start_up() -> None:
    with pytest.raises(StartupError, match="DEFAULT_MODE: mode fused-int8 is not served here"):
        ModeSelector(ModeChoice.FUSED_INT8, WITHOUT_INT8)
