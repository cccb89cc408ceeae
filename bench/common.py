"""What every experiment shares: the machine, the service's runtime timed in interleaved rounds, the mean of
per-round figures with its 95 % interval, markdown tables, and the docs' sections that full runs rewrite."""

from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import onnxruntime as ort

from app.core.model import runtime_options
from app.engine.resources import usable_cores
from app.engine.runtime import EnsembleRuntime
from app.engine.timing import mean_interval
from app.settings import Settings
from ensemble_contract.modes import Mode

NAN = float("nan")
K = TypeVar("K")
V = TypeVar("V")
Setup = tuple[Settings, Mode]  # one way to run a model: the service's runtime under these settings, in this mode


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries the reports."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Machine:
    """What a result was measured on: only ratios travel between machines."""

    cpu: str
    cores: int
    onnxruntime: str
    python: str
    load_average: tuple[float, float, float] | None
    measured_at: str

    @classmethod
    def current(cls) -> Machine:
        info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        now = datetime.now(UTC).isoformat(timespec="seconds")
        cpu = cpu or platform.processor() or "unknown"
        return cls(cpu, usable_cores().count, ort.__version__, platform.python_version(), load, now)

    def describe(self) -> str:
        load = "n/a" if self.load_average is None else " ".join(f"{x:.2f}" for x in self.load_average)
        software = f"onnxruntime {self.onnxruntime}, Python {self.python}"
        return f"{self.cpu}, {self.cores} cores, {software}, load average {load}, {self.measured_at}"


@dataclass(frozen=True)
class Budget:
    """How long one setup is timed in a round: warm-up calls, then timed calls up to a count or a duration."""

    warmup: int
    runs: int
    max_seconds: float

    def time(self, call: Callable[[], object]) -> list[float]:
        """The timed calls' durations in seconds; at least one, however long it takes."""
        for _ in range(self.warmup):
            call()
        seconds: list[float] = []
        deadline = time.perf_counter() + self.max_seconds
        while len(seconds) < self.runs and (not seconds or time.perf_counter() < deadline):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return seconds


def interleave(keys: Sequence[K], rounds: int, measure: Callable[[K], V]) -> dict[K, list[V]]:
    """`rounds` rounds; round r measures every key once, in turn, the order rotated by r. Returns each key's figures,
    one per round, so that ratios are taken within a round and a drifting machine moves both sides alike."""
    per_round: dict[K, list[V]] = {key: [] for key in keys}
    for round_ in range(rounds):
        shift = round_ % len(keys)
        for key in (*keys[shift:], *keys[:shift]):
            per_round[key].append(measure(key))
    return per_round


def time_in_process(setups: Mapping[str, Setup], budget: Budget, rounds: int) -> dict[str, list[list[float]]]:
    """Each named setup's durations (seconds, a list per round) on the model's example input, in interleaved rounds
    in this process, one runtime per distinct settings, all loaded first. A setup's warm-up calls absorb the spinning
    its predecessor's pools leave."""
    with ExitStack() as stack:
        runtimes: dict[str, EnsembleRuntime] = {}
        for settings, _ in setups.values():
            if settings.model_dump_json() not in runtimes:
                runtime = runtimes[settings.model_dump_json()] = EnsembleRuntime.load(runtime_options(settings))
                stack.callback(runtime.close)

        def measure(name: str) -> list[float]:
            settings, mode = setups[name]
            runtime = runtimes[settings.model_dump_json()]
            feeds = runtime.manifest.example_inputs()
            return budget.time(lambda: runtime.infer(feeds, mode))

        return interleave(list(setups), rounds, measure)


@dataclass(frozen=True)
class Interval:
    """The mean of per-round figures with its 95 % t-interval (unbounded with one round; NaN if a round has none)."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        if not all(math.isfinite(v) for v in values):
            return cls(NAN, NAN, NAN)
        return cls(*mean_interval(values))

    @classmethod
    def of_ratios(cls, numerators: Sequence[float], denominators: Sequence[float]) -> Interval:
        """The mean of the rounds' ratios (round i's numerator over round i's denominator), with its interval."""
        return cls.of([n / d if d else NAN for n, d in zip(numerators, denominators, strict=True)])

    def brief(self) -> str:
        """For a table cell: "1.52 [1.40-1.64]"."""
        return "n/a" if math.isnan(self.mean) else f"{self.mean:.2f} [{self.low:.2f}-{self.high:.2f}]"

    def check(self, name: str, *, at_least: float | None = None, at_most: float | None = None) -> str:
        """One line: the figure, and whether its whole interval is on the bound's side (all a noisy machine can
        say)."""
        inside = (at_least is None or self.low >= at_least) and (at_most is None or self.high <= at_most)
        bounds = " and ".join(f"{sign} {bound:g}" for sign, bound in ((">=", at_least), ("<=", at_most)) if bound)
        whole = "the whole interval" if inside else "not the whole interval"
        return f"{name}: {self.mean:.2f} [95% CI {self.low:.2f}-{self.high:.2f}], {whole} {bounds}"


@dataclass(frozen=True)
class Report:
    """What a command measured, in markdown, and the chart and data it wrote; `measured_on`: the machine and time
    of the earlier data it was re-rendered from (None: here, now)."""

    text: str
    figure: Path | None = None
    data: Path | None = None
    measured_on: str | None = None


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])


def update_section(path: Path, name: str, body: str) -> None:
    """Replaces the text between `<!-- bench:NAME:start -->` and its end marker (appends the section if absent)."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.lstrip())
