"""`python -m bench layouts --model-dir DIR`: the service with today's layout (one slot on every core) against the
layout DEFAULT_MODE=auto picks, through HTTP with `hey`, in interleaved rounds; and goodput under overload.

Two servers run side by side on loopback (an idle one costs nothing: spinning is off) and take turns:
- saturated throughput in the fused and fused-int8 modes, `--clients` closed-loop clients, auto's layout over
  one slot (target >= 1.3x);
- under overload, on auto's layout: 32 clients that retry at once when refused, against 4 clients: goodput
  (answered requests a second) >= 0.9x, refusals' p99 <= 20 ms, accepted p99 within LATENCY_BUDGET_MS;
- afterwards, every candidate measured again in-process: auto's choice within 5 % of the best.
Every ratio is a mean over rounds with a 95 % t-interval; a target is met only when its whole interval is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.engine.auto import CandidateFigures, choose
from app.engine.timing import percentiles_ms
from app.settings import Settings
from bench.core import Interval, Machine, interval_check, log
from bench.http_load import Reply, free_port, hey, started, v2_bodies
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode


def _throughput(replies: Sequence[Reply], seconds: float) -> float:
    return sum(r.status == 200 for r in replies) / seconds


@dataclass(frozen=True)
class Target:
    url: str  # the inference path of one server
    body: Path


def _saturated(one: Target, auto: Target, clients: int, seconds: float, turn: int) -> tuple[float, float]:
    """Answered requests a second of each server at `clients`, the two taking turns (who goes first alternates)."""
    measured = {}
    for name, target in ((("one", one), ("auto", auto)))[:: 1 if turn % 2 == 0 else -1]:
        measured[name] = _throughput(hey(target.url, target.body, concurrency=clients, seconds=seconds), seconds)
    return measured["one"], measured["auto"]


def _overload(target: Target, seconds: float) -> tuple[float, float, float, int]:
    """Goodput at 32 retrying clients over throughput at 4, refusals' and accepted p99 (ms), refusals."""
    calm = _throughput(hey(target.url, target.body, concurrency=4, seconds=seconds), seconds)
    stormy = hey(target.url, target.body, concurrency=32, seconds=seconds)
    refusals = [r.seconds for r in stormy if r.status == 503]
    accepted = [r.seconds for r in stormy if r.status == 200]
    (refused_p99,) = percentiles_ms(refusals, [99]) if refusals else [0.0]
    (accepted_p99,) = percentiles_ms(accepted, [99]) if accepted else [float("inf")]
    return _throughput(stormy, seconds) / calm, refused_p99, accepted_p99, len(refusals)


def _again(model_dir: Path, choice: dict[str, Any], auto_budget_s: float) -> Interval:
    """The chosen candidate's throughput over the best one's when every candidate is measured again (here,
    in-process, after the servers stopped): exactly 1 when it ranks first again, otherwise the interval from the
    two candidates' own intervals."""
    runtime, again = choose(Settings(model_dir=model_dir, default_mode="auto", auto_budget_s=auto_budget_s))
    runtime.close()
    chosen = next(c for c in again.candidates if (c.mode, c.layout) == (choice["mode"], choice["layout"]))
    best = again.candidates[0]
    if chosen == best:  # ranked first again: it is the best
        return Interval(1.0, 1.0, 1.0)

    def bounds(c: CandidateFigures) -> tuple[float, float]:
        low, high = c.throughput_ci95
        return (low or c.throughput_per_s, high or c.throughput_per_s)

    (chosen_low, chosen_high), (best_low, best_high) = bounds(chosen), bounds(best)
    return Interval(chosen.throughput_per_s / best.throughput_per_s, chosen_low / best_high, chosen_high / best_low)


def run(model_dir: Path, rounds: int, seconds: float, clients: int, auto_budget_s: float) -> str:
    manifest = load_manifest(model_dir)
    lines = [f"machine: {Machine.current().describe()}", f"{model_dir}: {rounds} rounds of {seconds:g} s windows"]
    with tempfile.TemporaryDirectory() as work:
        bodies = v2_bodies(manifest, Path(work))
        base = {"MODEL_DIR": str(model_dir.resolve()), "LOG_LEVEL": "warning"}
        ports = free_port(), free_port()
        one_env = base | {"PORT": str(ports[0]), "INFERENCE_SLOTS": "1", "DEFAULT_MODE": "fused"}
        auto_env = base | {"PORT": str(ports[1]), "DEFAULT_MODE": "auto", "AUTO_BUDGET_S": str(auto_budget_s)}
        auto_start_s = auto_budget_s + 180
        with (
            started(["-m", "app"], one_env, ports[0], Path(work) / "one.log", "/readyz") as one,
            started(
                ["-m", "app"], auto_env, ports[1], Path(work) / "auto.log", "/readyz", timeout_s=auto_start_s
            ) as auto,
        ):
            choice = httpx.get(auto.url + "/readyz", timeout=10).json()["auto"]
            served = [Mode(m) for m in httpx.get(one.url + "/readyz", timeout=10).json()["modes"]]
            lines.append(f"auto chose {choice['mode']} in layout {choice['layout']}: {choice['reason']}")
            infer = f"/v2/models/{manifest.name}/infer"
            modes = [m for m in (Mode.FUSED, Mode.FUSED_INT8) if m in served]
            ratios: dict[Mode, list[float]] = {m: [] for m in modes}
            overload: list[tuple[float, float, float, int]] = []
            for turn in range(rounds):
                for mode in modes:
                    once, auto_s = _saturated(
                        Target(one.url + infer, bodies[mode]),
                        Target(auto.url + infer, bodies[mode]),
                        clients,
                        seconds,
                        turn,
                    )
                    ratios[mode].append(auto_s / once)
                    log(f"[layouts] round {turn + 1} {mode}: one slot {once:.1f}/s, auto's layout {auto_s:.1f}/s")
                overload.append(_overload(Target(auto.url + infer, bodies[Mode(choice["mode"])]), seconds))
                ratio, _, _, refused = overload[-1]
                log(f"[layouts] round {turn + 1} overload: goodput ratio {ratio:.2f}, {refused} refused")
    lines.append(
        interval_check(
            "auto's choice / the best, all measured again in-process",
            _again(model_dir, choice, auto_budget_s),
            at_least=0.95,
        )
    )
    goodput, refused_p99, accepted_p99, _ = zip(*overload, strict=True)
    lines += [
        interval_check(
            f"saturated throughput, {mode}: auto's layout / one slot", Interval.of(ratios[mode]), at_least=1.3
        )
        for mode in modes
    ]
    lines += [
        interval_check("goodput at 32 retrying clients / throughput at 4", Interval.of(goodput), at_least=0.9),
        interval_check("refusals' p99 at 32 clients, ms", Interval.of(refused_p99), at_most=20),
        interval_check(
            "accepted p99 at 32 clients, ms", Interval.of(accepted_p99), at_most=choice["latency_budget_ms"]
        ),
    ]
    return "\n".join(lines)
