"""Where a build's time goes: wall and CPU seconds per phase, written to the build log.

CPU seconds count this process and the worker processes it has waited for (members trained at once), so a phase
that ran on both cores shows about twice its wall time in CPU, and one slowed down by other work on the machine
shows a wall time above its CPU time (the load average says how busy the machine was).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from model_build.directory import log


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended and been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Stopwatch:
    """Wall and CPU seconds since it started."""

    wall_start: float
    cpu_start: float

    @classmethod
    def start(cls) -> Stopwatch:
        return cls(time.perf_counter(), cpu_seconds())

    def describe(self) -> str:
        wall, cpu = time.perf_counter() - self.wall_start, cpu_seconds() - self.cpu_start
        return f"{wall:.1f} s ({cpu:.1f} s CPU)"

    def report(self, phase: str) -> None:
        """Logs `<phase> took 12.3 s (20.1 s CPU), load average 1.9`."""
        log(f"{phase} took {self.describe()}, load average {os.getloadavg()[0]:.1f}")


@contextmanager
def timed(phase: str) -> Iterator[None]:
    """Logs how long the body took (`Stopwatch.report`)."""
    watch = Stopwatch.start()
    yield
    watch.report(phase)
