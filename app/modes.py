"""The ways the ensemble can run, and how a request's mode is chosen."""

from __future__ import annotations

import itertools
from enum import StrEnum


class Mode(StrEnum):
    """How one inference runs the ensemble."""

    FUSED = "fused"  # one session on the fused graph
    SEQUENTIAL = "sequential"  # the member sessions one after another
    PARALLEL = "parallel"  # the member sessions at the same time, one thread each


class ModeChoice(StrEnum):
    """What configuration or a request may ask for: a mode, or `compare` to rotate over all of them."""

    FUSED = "fused"
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"
    COMPARE = "compare"


class ModeSelector:
    """Resolves a choice to a mode; `compare` hands out the modes in turn, so traffic splits evenly."""

    def __init__(self, default: ModeChoice) -> None:
        self.default = default
        self._rotation = itertools.cycle(Mode)

    def pick(self, requested: ModeChoice | None = None) -> Mode:
        choice = requested or self.default
        if choice is ModeChoice.COMPARE:
            return next(self._rotation)
        return Mode(choice.value)
