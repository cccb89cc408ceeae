"""The ways the ensemble can run, and how a request's mode is chosen."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from enum import StrEnum

from app.errors import InvalidParameter, StartupError


class Mode(StrEnum):
    """How one inference runs the ensemble."""

    FUSED = "fused"  # one session on the fused graph
    SEQUENTIAL = "sequential"  # the member sessions one after another
    PARALLEL = "parallel"  # the member sessions at the same time, one thread each
    FUSED_INT8 = "fused-int8"  # one session on the fused graph quantised to int8, if the build shipped it


class ModeChoice(StrEnum):
    """What configuration or a request may ask for: a mode, or `compare` to rotate over the served ones."""

    FUSED = "fused"
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"
    FUSED_INT8 = "fused-int8"
    COMPARE = "compare"


class ModeSelector:
    """Resolves a choice to one of the modes served; `compare` hands them out in turn, so traffic splits evenly."""

    def __init__(self, default: ModeChoice, served: Sequence[Mode]) -> None:
        self.served = tuple(served)
        self.default = default
        self._rotation = itertools.cycle(self.served)
        if default is not ModeChoice.COMPARE and Mode(default.value) not in self.served:
            raise StartupError(f"DEFAULT_MODE: {self._not_served(Mode(default.value))}")

    def pick(self, requested: ModeChoice | None = None) -> Mode:
        choice = requested or self.default
        if choice is ModeChoice.COMPARE:
            return next(self._rotation)
        mode = Mode(choice.value)
        if mode not in self.served:
            raise InvalidParameter(self._not_served(mode))
        return mode

    def _not_served(self, mode: Mode) -> str:
        # Only fused-int8 can be missing: the build ships it when it keeps the accuracy.
        return (
            f"mode {mode} is not served here (served: {', '.join(self.served)}): the model directory has no "
            "int8 ensemble"
        )
