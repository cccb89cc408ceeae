"""How a request's mode is chosen among the modes served (the modes themselves: ensemble_contract.modes)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from app.errors import InvalidParameter, StartupError
from ensemble_contract.modes import AUTO, COMPARE, Mode, ModeChoice


class ModeSelector:
    """Resolves a choice to one of the modes served; `compare` hands them out in turn, so traffic splits evenly;
    `auto` is the mode measured fastest at start-up, when DEFAULT_MODE=auto had it measured."""

    def __init__(self, default: ModeChoice, served: Sequence[Mode], auto: Mode | None = None) -> None:
        self.served = tuple(served)
        self.default = default
        self.auto = auto
        self._rotation = itertools.cycle(self.served)
        if default not in (COMPARE, AUTO) and Mode(default.value) not in self.served:
            raise StartupError(f"DEFAULT_MODE: {self._not_served(Mode(default.value))}")

    def pick(self, requested: ModeChoice | None = None) -> Mode:
        choice = requested or self.default
        if choice == COMPARE:
            return next(self._rotation)
        if choice == AUTO:
            if self.auto is None:
                raise InvalidParameter("mode auto was not measured at start-up: start with DEFAULT_MODE=auto")
            return self.auto
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
