"""`python -m bench compare --model-dir DIR`: fused or separate, for any model directory, on this machine.

Every mode the directory serves, in interleaved rounds, in-process (the service's runtime) and over /v2 (`hey`, one
client). A round's figure is the 10 %-trimmed mean of its calls (finer than a median of hey's 0.1 ms readings).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings
from bench.common import NAN, Budget, Interval, Report, table, time_in_process
from bench.service import service_process
from bench.serving import Target, load_rounds, v2_body
from ensemble_contract.manifest import load_manifest
from ensemble_contract.modes import Mode, served_modes

TRIMMED = 0.1  # of each end


def trimmed_mean(seconds: Sequence[float]) -> float:
    """In milliseconds, without the `TRIMMED` share of the fastest and of the slowest."""
    ordered = sorted(seconds)
    cut = int(len(ordered) * TRIMMED)
    return statistics.fmean(ordered[cut : len(ordered) - cut]) * 1000 if ordered else NAN


@dataclass(frozen=True)
class Ratio:
    mode: Mode
    typical_ms: float  # the median of the rounds' figures
    to_fused: Interval

    def cell(self) -> str:
        """The ratio, bold when its whole interval is on one side of 1."""
        clear = self.to_fused.low > 1 or self.to_fused.high < 1
        return f"**{self.to_fused.brief()}**" if clear and self.mode is not Mode.FUSED else self.to_fused.brief()


def ratios(per_round: dict[Mode, list[float]]) -> list[Ratio]:
    """Each mode's figures over fused's, round by round."""
    fused = per_round[Mode.FUSED]
    return [Ratio(m, statistics.median(f), Interval.of_ratios(f, fused)) for m, f in per_round.items()]


def verdict(found: Sequence[Ratio]) -> str:
    """One line: which mode is fastest, and whether the whole interval says so."""
    others = [r for r in found if r.mode is not Mode.FUSED]
    faster = [r for r in others if r.to_fused.high < 1]
    slower = [r for r in others if r.to_fused.low > 1]
    if faster:
        best = min(faster, key=lambda r: r.to_fused.mean)
        return f"{best.mode} beats fused here ({best.to_fused.mean:.2f}x, the whole interval below 1)"
    if len(slower) == len(others):
        return "fused is the fastest here: every other mode is slower with its whole interval above 1"
    unclear = ", ".join(str(r.mode) for r in others if r not in slower)
    return f"fused is not beaten; {unclear} cannot be told apart from it in this run (more --rounds)"


def run(model_dir: Path, calls: int, rounds: int, seconds: float, work: Path) -> Report:
    budget = Budget(3, calls, 10)
    manifest = load_manifest(model_dir)
    modes = served_modes(manifest)
    settings = Settings(model_dir=model_dir)
    timed = time_in_process({mode: (settings, mode) for mode in modes}, budget, rounds)
    in_process = ratios({Mode(m): [trimmed_mean(calls) for calls in per_round] for m, per_round in timed.items()})
    with service_process(model_dir, work) as service:
        url = f"{service.url}/v2/models/{manifest.name}/infer"
        targets = [Target(mode, url, v2_body(manifest, mode, work / f"{mode}.json")) for mode in modes]
        runs = load_rounds(targets, (1,), seconds, rounds)
    over_v2 = ratios({Mode(t.name): [trimmed_mean(run.accepted) for run in runs[t, 1]] for t in targets})
    rows = [
        [a.mode, f"{a.typical_ms:.3f} ms", a.cell(), f"{b.typical_ms:.2f} ms", b.cell()]
        for a, b in zip(in_process, over_v2, strict=True)
    ]
    headers = ["mode", "in-process", "÷ fused [95 % CI]", "over /v2", "÷ fused [95 % CI]"]
    header = (
        f"Model directory {model_dir} ({manifest.name}), {rounds} interleaved rounds: in-process {budget.runs} calls "
        f"a mode a round (the service's runtime, default settings), over /v2 {seconds:g} s of `hey` a mode a round "
        "(one client). Each round's figure is the 10 %-trimmed mean of its calls."
    )
    verdicts = f"In-process: {verdict(in_process)}.\n\nOver /v2: {verdict(over_v2)}."
    return Report("\n\n".join([header, table(headers, rows), verdicts]))
