"""The measuring core every experiment shares: what a result was measured on, the one timing loop, the ways to
run a model directory in-process, one process per configuration, and the statistics and targets of the results.

    python -m bench.core                a worker: reads a spec (one JSON line), then times it once per further line

Every offline configuration is timed in a process of its own (a `Worker` runs this module), so that no session,
thread pool or allocator of one configuration lives beside another's. `measure_interleaved` keeps one worker per
configuration for several rounds and times them in turn, the order rotated each round, so that a ratio of two
configurations is taken within a round, and its interval over the rounds survives a drifting machine. Runner names:

    separate-*   one session per member, run one after another
    parallel     one session per member, run at the same time in threads, the cores split between them
    fused-*      one session on ensemble.onnx
    alone:<i>    member i by itself (for "the sum of the members alone")
    service:<m>  the service's own runtime (app.engine.runtime) in mode m, with the service's settings

Every runner takes the same inputs (by name) and combines the members with ensemble_contract.combine, as the
fused graph does, so the configurations differ only in how ONNX Runtime is asked to do the work.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from app.engine.resources import available_cores
from app.engine.timing import percentiles_ms
from ensemble_contract.combine import combine
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], object]
ALONE_PREFIX = "alone:"
SERVICE_PREFIX = "service:"
ORT_ERRORS_ONLY = 3
RESULT_MARKER = "BENCH-RESULT "
READY_MARKER = "BENCH-READY"
START_UP_ALLOWANCE_S = 120.0  # a worker's imports, session creation and warm-up, on a busy machine


def log(message: str) -> None:
    """Progress and targets go to stderr; stdout carries the reports."""
    print(message, file=sys.stderr, flush=True)


# What a result was measured on: printed with and stored in every result, since only ratios travel.


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


class Machine(BaseModel):
    cpu: str
    cores: int
    onnxruntime: str
    python: str
    load_average: tuple[float, float, float] | None
    measured_at: str

    @classmethod
    def current(cls) -> Machine:
        return cls(
            cpu=_cpu_model(),
            cores=available_cores(),
            onnxruntime=ort.__version__,
            python=platform.python_version(),
            load_average=_load_average(),
            measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def describe(self) -> str:
        load = "n/a" if self.load_average is None else " ".join(f"{x:.2f}" for x in self.load_average)
        return (
            f"{self.cpu}, {self.cores} cores, onnxruntime {self.onnxruntime}, Python {self.python}, "
            f"load average {load}, {self.measured_at}"
        )


# Statistics: latency summaries (median and tail percentiles of a list of durations), and the mean of a few
# per-round figures with its 95 % confidence interval.


class Summary(BaseModel):
    """Durations in milliseconds."""

    count: int
    median_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        if not seconds:
            raise ValueError("no samples to summarise")
        p50, p95, p99 = percentiles_ms(seconds, [50, 95, 99])
        return cls(
            count=len(seconds),
            median_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            mean_ms=statistics.fmean(seconds) * 1000,
            min_ms=min(seconds) * 1000,
        )

    def brief(self) -> str:
        return f"p50 {self.median_ms:.2f} ms, p95 {self.p95_ms:.2f} ms (n={self.count})"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def moved(alone: float, interleaved: float) -> float:
    """How far interleaving moved a figure, whichever way: interleaved / alone or its inverse, the larger."""
    r = ratio(interleaved, alone)
    return max(r, 1 / r) if r > 0 and not math.isnan(r) else float("nan")


@dataclass(frozen=True)
class Interval:
    """A mean over rounds with its 95 % t-interval (unbounded with one round)."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Interval:
        """NaN (or infinite) throughout when a round's figure is: not measured in that round (or no answer)."""
        mean = statistics.fmean(values)
        if not math.isfinite(mean):
            return cls(mean, mean, mean)
        if len(values) < 2:
            return cls(mean, float("-inf"), float("inf"))
        half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
        return cls(mean, mean - half, mean + half)

    @classmethod
    def of_ratios(cls, numerators: Sequence[float], denominators: Sequence[float]) -> Interval:
        """The mean of per-round ratios (round i's numerator over round i's denominator), with its interval."""
        return cls.of([ratio(n, d) for n, d in zip(numerators, denominators, strict=True)])

    def __str__(self) -> str:
        return f"{self.mean:.2f} [95% CI {self.low:.2f}-{self.high:.2f}]"

    def brief(self) -> str:
        """For a table cell: "1.52 [1.40-1.64]"."""
        return f"{self.mean:.2f} [{self.low:.2f}-{self.high:.2f}]"


K = TypeVar("K")
V = TypeVar("V")


def interleave(keys: Sequence[K], rounds: int, measure: Callable[[K], V]) -> dict[K, list[V]]:
    """`rounds` rounds; round r measures every key once, in turn, the order rotated by r. Returns each key's figures,
    one per round, so that ratios are taken within a round and a drifting machine moves both sides alike."""
    per_round: dict[K, list[V]] = {key: [] for key in keys}
    for round_ in range(rounds):
        shift = round_ % len(keys)
        for key in (*keys[shift:], *keys[:shift]):
            per_round[key].append(measure(key))
    return per_round


# Targets: a measured figure against its limit.


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    at_most: bool = True  # the target is value <= limit (else value >= limit)
    unit: str = "x"

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "not measured"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "met" if ok else "MISSED"

    def row(self) -> list[str]:
        sign = "≤" if self.at_most else "≥"
        return [self.name, f"{self.value:.2f}{self.unit}", f"{sign} {self.limit:g}{self.unit}", self.verdict]


def interval_check(
    name: str, interval: Interval, *, at_least: float | None = None, at_most: float | None = None
) -> str:
    """One line: a target met only when the whole interval is on its side (both sides, when both are given)."""
    met = (at_least is None or interval.low >= at_least) and (at_most is None or interval.high <= at_most)
    bounds = [f"{sign} {bound:g}" for sign, bound in ((">=", at_least), ("<=", at_most)) if bound is not None]
    return f"{'MET   ' if met else 'MISSED'} {name}: {interval} (target {' and '.join(bounds)})"


# The one timing loop every offline measurement uses.


@dataclass(frozen=True)
class Budget:
    """How long each configuration is timed: warm-up calls, then timed calls up to a count or a duration."""

    warmup: int
    runs: int
    max_seconds: float


def time_calls(
    calls: Sequence[Callable[[], object]], *, warmup: int, runs: int, max_seconds: float
) -> list[list[float]]:
    """Calls `calls` in turn (a rotation), `warmup` rounds untimed, then up to `runs` timed rounds.

    Stops early once `max_seconds` of timed rounds have passed (after at least one round). Returns the
    durations in seconds per call: result[i] holds call i's samples, in order.
    """
    if not calls:
        raise ValueError("nothing to time")
    for _ in range(warmup):
        for call in calls:
            call()
    samples: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + max_seconds
    for _ in range(runs):
        for call, durations in zip(calls, samples, strict=True):
            start = time.perf_counter()
            call()
            durations.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return samples


# Ways to run a model directory's ensemble in this process, by name.


class Layout(StrEnum):
    SEPARATE = "separate"
    PARALLEL = "parallel"
    FUSED = "fused"


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session options; None keeps ONNX Runtime's default."""

    allow_spinning: bool | None = None
    intra_op_threads: int | None = None
    global_pool: bool = False  # one process-wide intra-op pool shared by every session

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = ORT_ERRORS_ONLY
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.allow_spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.global_pool:
            options.use_per_session_threads = False
        return options

    def describe(self) -> str:
        if self == SessionConfig():
            return "default SessionOptions"
        parts = []
        if self.intra_op_threads is not None:
            parts.append(f"intra_op_num_threads={self.intra_op_threads}")
        if self.allow_spinning is not None:
            parts.append(f"allow_spinning={int(self.allow_spinning)}")
        if self.global_pool:
            parts.append("global thread pool")
        return ", ".join(parts)


@dataclass(frozen=True)
class RunConfig:
    name: str
    layout: Layout
    session: SessionConfig = field(default_factory=SessionConfig)
    member: int | None = None  # only this member, alone
    summary: str = ""


CONFIGS: dict[str, RunConfig] = {
    c.name: c
    for c in (
        RunConfig("separate-default", Layout.SEPARATE, summary="separate sessions in a loop, default options"),
        RunConfig(
            "separate-nospin",
            Layout.SEPARATE,
            SessionConfig(allow_spinning=False),
            summary="separate sessions in a loop, spinning off",
        ),
        RunConfig(
            "separate-globalpool",
            Layout.SEPARATE,
            SessionConfig(global_pool=True),
            summary="separate sessions in a loop sharing one global thread pool",
        ),
        RunConfig(
            "parallel",
            Layout.PARALLEL,
            SessionConfig(allow_spinning=False),
            summary="separate sessions at the same time in threads, cores // members intra-op threads each",
        ),
        RunConfig("fused-default", Layout.FUSED, summary="one session on the fused graph, default options"),
        RunConfig(
            "fused-nospin", Layout.FUSED, SessionConfig(allow_spinning=False), summary="fused graph, spinning off"
        ),
    )
}


def alone(member: int) -> RunConfig:
    return RunConfig(f"{ALONE_PREFIX}{member}", Layout.SEPARATE, member=member, summary=f"member {member} alone")


def config_named(name: str) -> RunConfig:
    if name.startswith(ALONE_PREFIX):
        return alone(int(name.removeprefix(ALONE_PREFIX)))
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown configuration {name!r}; known: {sorted(CONFIGS)} and alone:<i>") from None


def _session(path: Path, session: SessionConfig) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session.options(), providers=["CPUExecutionProvider"])


def open_runner(
    model_dir: Path, config: RunConfig, fused_file: Path | None = None, intra_op_threads: int | None = None
) -> Runner:
    """A runner for `config` over the model directory; `fused_file` replaces ensemble.onnx (e.g. an int8 one);
    `intra_op_threads` replaces the configuration's intra-op threads (every session's)."""
    manifest = load_manifest(model_dir, verify_files=False)
    if intra_op_threads is not None:
        config = replace(config, session=replace(config.session, intra_op_threads=intra_op_threads))
    if config.session.global_pool:
        ort.set_global_thread_pool_sizes(available_cores(), 1)  # must precede the first session of the process
    if config.layout is Layout.FUSED:
        fused = _session(fused_file or model_dir / manifest.ensemble.path, config.session)
        return lambda feeds: fused.run(None, feeds)
    members = list(manifest.members) if config.member is None else [manifest.members[config.member]]
    session_config = config.session
    if config.layout is Layout.PARALLEL and session_config.intra_op_threads is None:
        session_config = SessionConfig(session_config.allow_spinning, max(1, available_cores() // len(members)))
    sessions = [_session(model_dir / m.file.path, session_config) for m in members]
    names = list(manifest.member_outputs)

    def run(session: ort.InferenceSession, feeds: Feeds) -> Feeds:
        return dict(zip(names, session.run(names, feeds), strict=True))

    weights = manifest.weights if config.member is None else None  # a member alone is not weighed
    if config.layout is Layout.SEPARATE:
        return lambda feeds: combine([run(s, feeds) for s in sessions], manifest.combine, weights)
    pool = ThreadPoolExecutor(len(sessions), thread_name_prefix="member")
    return lambda feeds: combine(list(pool.map(lambda s: run(s, feeds), sessions)), manifest.combine, weights)


# The service's own runtime (app.engine.runtime) in this process: the in-process floor of each service mode.


def service_modes(model_dir: Path) -> tuple[str, ...]:
    """The modes the service serves for this model directory (fused-int8 only if the build shipped it)."""
    from app.engine.runtime import served_modes

    return tuple(mode.value for mode in served_modes(load_manifest(model_dir, verify_files=False)))


def service_runner_name(mode: Mode | str) -> str:
    return f"{SERVICE_PREFIX}{Mode(mode).value}"


def open_service_runners(model_dir: Path, names: Sequence[str], allow_spinning: bool | None) -> dict[str, Runner]:
    """One EnsembleRuntime, loaded as the service loads it (its default settings unless spinning is given),
    and a runner per `service:<mode>` name. The service is imported only when asked."""
    from app.engine.runtime import EnsembleRuntime
    from app.settings import Settings

    overrides: dict[str, object] = {"model_dir": model_dir}
    if allow_spinning is not None:
        overrides["allow_spinning"] = allow_spinning
    runtime = EnsembleRuntime.load(Settings(**overrides))
    runners: dict[str, Runner] = {}
    for name in names:
        mode = Mode(name.removeprefix(SERVICE_PREFIX))
        if mode not in runtime.modes:
            raise ValueError(f"{model_dir} does not serve {mode}: it serves {', '.join(runtime.modes)}")
        runners[name] = lambda batch, mode=mode: runtime.infer(batch, mode)
    return runners


# One configuration in a process of its own.


class MeasureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path
    rotation: tuple[str, ...] = Field(min_length=1, description="Runner names timed in turn, one call each.")
    warmup: int = Field(ge=0)
    runs: int = Field(ge=1)
    max_seconds: float = Field(gt=0)
    fused_file: Path | None = Field(None, description="Replaces ensemble.onnx for the fused-* runners.")
    service_allow_spinning: bool | None = Field(None, description="service:<mode> runners; None: service default.")
    intra_op_threads: int | None = Field(None, ge=1, description="Replaces every runner's intra-op threads.")

    @classmethod
    def of(cls, model_dir: Path, rotation: tuple[str, ...], budget: Budget, **options: object) -> MeasureSpec:
        return cls(
            model_dir=model_dir,
            rotation=rotation,
            warmup=budget.warmup,
            runs=budget.runs,
            max_seconds=budget.max_seconds,
            **options,  # type: ignore[arg-type]
        )


class Measurement(BaseModel):
    spec: MeasureSpec
    machine: Machine
    results: dict[str, Summary]


def mean_load(measurements: Sequence[Measurement]) -> float | None:
    """The mean 1-minute load average the measurements were taken at (None where the platform has none)."""
    loads = [m.machine.load_average[0] for m in measurements if m.machine.load_average]
    return statistics.fmean(loads) if loads else None


class MeasureError(RuntimeError):
    """A worker failed or ran out of time."""


def open_runners(spec: MeasureSpec) -> dict[str, Runner]:
    names = list(dict.fromkeys(spec.rotation))
    service = [n for n in names if n.startswith(SERVICE_PREFIX)]
    runners = open_service_runners(spec.model_dir, service, spec.service_allow_spinning) if service else {}
    for name in names:
        if name not in runners:
            runners[name] = open_runner(spec.model_dir, config_named(name), spec.fused_file, spec.intra_op_threads)
    return runners


def measure(spec: MeasureSpec, runners: dict[str, Runner] | None = None) -> Measurement:
    """Times `spec` in this process: a batch of one that fits the model's signature, through each runner (opened
    here unless given)."""
    runners = runners or open_runners(spec)
    batch = load_manifest(spec.model_dir, verify_files=False).example_inputs()
    calls = [lambda runner=runners[name]: runner(batch) for name in spec.rotation]
    samples = time_calls(calls, warmup=spec.warmup, runs=spec.runs, max_seconds=spec.max_seconds)
    per_name: dict[str, list[float]] = {}
    for name, durations in zip(spec.rotation, samples, strict=True):
        per_name.setdefault(name, []).extend(durations)
    results = {name: Summary.of(durations) for name, durations in per_name.items()}
    return Measurement(spec=spec, machine=Machine.current(), results=results)


class Worker:
    """A process of its own for one MeasureSpec (`python -m bench.core`), kept between rounds: it opens its runners
    once, says it is ready, then times the spec (warm-up included) each time it is asked, until it is closed."""

    def __init__(self, spec: MeasureSpec) -> None:
        self.spec = spec
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.core"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._send(spec.model_dump_json())

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(line + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            raise self._error("exited") from None

    def _error(self, what: str) -> MeasureError:
        self._stderr.seek(0)
        tail = "\n".join(self._stderr.read().strip().splitlines()[-8:])
        return MeasureError(f"{list(self.spec.rotation)} on {self.spec.model_dir}: {what}:\n{tail}")

    def _reply(self, marker: str, timeout: float) -> str:
        """The next line that starts with `marker`, without it."""
        stdout: IO[str] | None = self._process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                self.close()
                raise self._error(f"no answer within {timeout:.0f} s")
            line = stdout.readline()
            if not line:
                self._process.wait()
                raise self._error(f"failed (exit {self._process.returncode})")
            if line.startswith(marker):
                return line.removeprefix(marker).strip()

    def ready(self) -> Worker:
        """Waits until its runners are open (imports and sessions take a while on a busy machine)."""
        self._reply(READY_MARKER, START_UP_ALLOWANCE_S)
        return self

    def measure(self) -> Measurement:
        self._send("measure")
        timeout = self.spec.max_seconds * 2 + START_UP_ALLOWANCE_S
        return Measurement.model_validate_json(self._reply(RESULT_MARKER, timeout))

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stderr.close()


def measure_isolated(spec: MeasureSpec) -> Measurement:
    """Times `spec` once, in a fresh process, and returns what it measured."""
    with Worker(spec) as worker:
        return worker.ready().measure()


def measure_interleaved(specs: dict[str, MeasureSpec], rounds: int) -> dict[str, list[Measurement]]:
    """Each spec in a worker process of its own, all started (and ready) before the first round; then `rounds`
    rounds in which every spec is timed once, in turn, the order rotated each round (`interleave`). Returns
    each spec's measurements, one per round."""
    with contextlib.ExitStack() as stack:
        workers = {name: stack.enter_context(Worker(spec)) for name, spec in specs.items()}
        for worker in workers.values():
            worker.ready()
        return interleave(list(specs), rounds, lambda name: workers[name].measure())


def main() -> int:
    """A worker: the spec on the first line of stdin, then one measurement per further line, until end of input."""
    spec = MeasureSpec.model_validate_json(sys.stdin.readline())
    runners = open_runners(spec)
    print(READY_MARKER, flush=True)
    for _ in sys.stdin:
        print(RESULT_MARKER + measure(spec, runners).model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
