"""`python -m bench compare --model-dir DIR`: one command that answers "fused or separate?" for any model directory.

Times every served mode on this machine, in interleaved rounds (the modes' order rotates each round), twice:
in-process (the service's own runtime, its default settings) and through the service over /v2 (a compiled
client, `hey`, when it is installed; otherwise a Python client, said so in the output). Prints each mode's
latency ratio to fused with a 95 % confidence interval over the rounds, and a one-line verdict. A round's
figure for a mode is the 10 %-trimmed mean of its calls (robust to outliers, and finer than a median of
hey's 0.1 ms readings).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from scipy import stats

from app.engine.runtime import EnsembleRuntime
from app.settings import Settings
from bench.core import Interval, Machine, interleave, log
from bench.http_load import free_port, hey, hey_available, started, v2_bodies
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode


@dataclass(frozen=True)
class Ratio:
    mode: Mode
    typical_ms: float  # the median of the rounds' figures
    mean: float  # of the per-round ratios to fused
    low: float
    high: float

    def line(self) -> str:
        interval = f"[95% CI {self.low:.2f}-{self.high:.2f}]"
        return f"{self.mode:<11} {self.typical_ms:8.3f} ms   {self.mean:5.2f}x fused  {interval}"


def ratios(per_round: dict[Mode, list[float]]) -> list[Ratio]:
    """Each mode's per-round figure over fused's, with a t-interval over the rounds."""
    fused = per_round[Mode.FUSED]
    result = []
    for mode, figures in per_round.items():
        ratio = Interval.of_ratios(figures, fused)
        result.append(Ratio(mode, statistics.median(figures) * 1000, ratio.mean, ratio.low, ratio.high))
    return result


def typical(seconds: Sequence[float]) -> float:
    """A round's figure: the 10 %-trimmed mean."""
    return float(stats.trim_mean(seconds, 0.1))


def verdict(found: Sequence[Ratio]) -> str:
    """One line: which mode is fastest, and whether the whole interval says so."""
    others = [r for r in found if r.mode is not Mode.FUSED]
    faster = [r for r in others if r.high < 1]
    slower = [r for r in others if r.low > 1]
    if faster:
        best = min(faster, key=lambda r: r.mean)
        return f"{best.mode} beats fused here ({best.mean:.2f}x, the whole interval below 1)"
    if len(slower) == len(others):
        return "fused is the fastest here: every other mode is slower with its whole interval above 1"
    unclear = ", ".join(str(r.mode) for r in others if r not in slower)
    return f"fused is not beaten; {unclear} cannot be told apart from it in this run (more --rounds)"


def in_process(model_dir: Path, rounds: int, calls: int) -> dict[Mode, list[float]]:
    runtime = EnsembleRuntime.load(Settings(model_dir=model_dir))
    feeds = runtime.manifest.example_inputs()

    def median_call(mode: Mode) -> float:
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            runtime.infer(feeds, mode)
            seconds.append(time.perf_counter() - start)
        return typical(seconds)

    try:
        return interleave(runtime.modes, rounds, median_call)
    finally:
        runtime.close()


def _hey_median(url: str, body: Path, requests: int) -> float:
    replies = hey(url, body, concurrency=1, requests=requests)
    ok = [r.seconds for r in replies if r.status == 200]
    if len(ok) < requests:
        raise RuntimeError(f"hey: {requests - len(ok)} of {requests} requests failed against {url}")
    return typical(ok)


def _python_median(url: str, body: Path, requests: int) -> float:
    seconds = []
    data = body.read_bytes()
    with httpx.Client(timeout=30) as client:
        for _ in range(requests):
            start = time.perf_counter()
            client.post(url, content=data, headers={"content-type": "application/json"}).raise_for_status()
            seconds.append(time.perf_counter() - start)
    return typical(seconds)


def through_service(model_dir: Path, rounds: int, requests: int) -> dict[Mode, list[float]]:
    manifest = load_manifest(model_dir)
    client = _hey_median if hey_available() else _python_median
    log(f"[compare] HTTP client: {'hey' if client is _hey_median else 'Python httpx (install hey for a compiled one)'}")
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        bodies = v2_bodies(manifest, Path(work))
        env = {"MODEL_DIR": str(model_dir.resolve()), "PORT": str(port), "MAX_QUEUE": "64"}
        with started(["-m", "app"], env, port, Path(work) / "server.log", "/readyz") as server:
            served = httpx.get(server.url + "/readyz", timeout=10).json()["modes"]
            url = f"{server.url}/v2/models/{manifest.name}/infer"
            modes = [Mode(m) for m in served]
            for mode in modes:  # warm-up
                client(url, bodies[mode], 5)
            return interleave(modes, rounds, lambda mode: client(url, bodies[mode], requests))


def run(model_dir: Path, rounds: int, calls: int, requests: int) -> str:
    """The report: both tables and the verdicts."""
    lines = [
        f"model directory {model_dir}: {rounds} interleaved rounds, ratios of each round's figures to fused's",
        f"machine: {Machine.current().describe()}",
    ]
    measured = {
        f"in-process ({calls} calls a mode a round)": in_process(model_dir, rounds, calls),
        f"through the service, /v2 ({requests} requests a mode a round)": through_service(model_dir, rounds, requests),
    }
    for title, per_round in measured.items():
        found = ratios(per_round)
        lines += ["", title, *(r.line() for r in found), f"verdict: {verdict(found)}"]
    return "\n".join(lines)
