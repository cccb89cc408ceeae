"""`python -m bench interference`: interference between modes in one process. Each service mode timed alone,
then interleaved with the others (the served modes in turn, one inference at a time, as `compare` traffic does
with one slot).

Runs the service's own runtime in-process (no HTTP), one process per configuration, with the service's
default settings and with spinning flipped, so the effect of idle pools spinning shows. About 4 min on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from app.settings import Settings
from bench.core import Budget, MeasureSpec, Summary, log, measure_isolated, moved, service_modes, service_runner_name

SERVICE_DEFAULT_SPINNING: bool = bool(Settings.model_fields["allow_spinning"].default)


class InterferenceRow(BaseModel):
    allow_spinning: bool
    mode: str
    alone: Summary
    interleaved: Summary

    @property
    def moved(self) -> float:
        return moved(self.alone.median_ms, self.interleaved.median_ms)


def run(model_dir: Path, budget: Budget) -> list[InterferenceRow]:
    rows = []
    modes = service_modes(model_dir)
    names = [service_runner_name(m) for m in modes]
    for spinning in (SERVICE_DEFAULT_SPINNING, not SERVICE_DEFAULT_SPINNING):

        def measure(rotation: tuple[str, ...], spinning: bool = spinning) -> dict[str, Summary]:
            return measure_isolated(
                MeasureSpec.of(model_dir, rotation, budget, service_allow_spinning=spinning)
            ).results

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
