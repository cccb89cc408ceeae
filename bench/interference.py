"""Interference between modes in one process: each service mode timed alone, then interleaved with the others
(the served modes in turn, one inference at a time, as `compare` traffic does with one slot).

Runs the service's own runtime in-process (no HTTP), one process per configuration, with the service's
default settings and with spinning flipped, so the effect of idle pools spinning shows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from app.settings import Settings
from bench.isolated import measure_isolated
from bench.markdown import table
from bench.service_runtime import service_modes, service_runner_name
from bench.stats import Summary, ratio
from bench.targets import Check, checks_table
from bench.timing import Budget
from bench.worker import MeasureSpec

SERVICE_DEFAULT_SPINNING: bool = bool(Settings.model_fields["allow_spinning"].default)


class InterferenceRow(BaseModel):
    allow_spinning: bool
    mode: str
    alone: Summary
    interleaved: Summary

    @property
    def moved(self) -> float:
        r = ratio(self.interleaved.median_ms, self.alone.median_ms)
        return max(r, 1 / r)


def run(
    model_dir: Path,
    budget: Budget,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> list[InterferenceRow]:
    rows = []
    modes = service_modes(model_dir)
    names = [service_runner_name(m) for m in modes]
    for spinning in (SERVICE_DEFAULT_SPINNING, not SERVICE_DEFAULT_SPINNING):

        def measure(rotation: tuple[str, ...], spinning: bool = spinning) -> dict[str, Summary]:
            spec = MeasureSpec(
                model_dir=model_dir,
                rotation=rotation,
                warmup=budget.warmup,
                runs=budget.runs,
                max_seconds=budget.max_seconds,
                service_allow_spinning=spinning,
            )
            return measure_isolated(spec).results

        interleaved = measure(tuple(names))
        for mode, name in zip(modes, names, strict=True):
            rows.append(
                InterferenceRow(
                    allow_spinning=spinning, mode=mode, alone=measure((name,))[name], interleaved=interleaved[name]
                )
            )
            r = rows[-1]
            log(
                f"[interference] spinning={int(spinning)} {mode:<10} alone {r.alone.brief()}; "
                f"interleaved {r.interleaved.brief()}"
            )
    return rows


def checks(rows: list[InterferenceRow]) -> list[Check]:
    return [
        Check(f"{r.mode}: p50 moved by interleaving (service settings, in-process)", r.moved, 1.10)
        for r in rows
        if r.allow_spinning == SERVICE_DEFAULT_SPINNING
    ]


def markdown(rows: list[InterferenceRow], header: str) -> str:
    body = [
        [
            f"{int(r.allow_spinning)}{' (service default)' if r.allow_spinning == SERVICE_DEFAULT_SPINNING else ''}",
            r.mode,
            f"{r.alone.median_ms:.2f} ({r.alone.p95_ms:.2f})",
            f"{r.interleaved.median_ms:.2f} ({r.interleaved.p95_ms:.2f})",
            ratio(r.interleaved.median_ms, r.alone.median_ms),
        ]
        for r in rows
    ]
    headers = ["allow_spinning", "mode", "alone p50 (p95) ms", "interleaved p50 (p95) ms", "interleaved ÷ alone"]
    return "\n\n".join([header, table(headers, body), "Targets:", checks_table(checks(rows))])
