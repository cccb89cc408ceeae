"""Times one configuration in this process and prints the result: `python -m bench.worker < spec.json`.

Run by `bench.isolated`, one process per configuration, so that no session, thread pool or allocator of
one configuration disturbs another.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from bench.engines import Feeds, Runner, config_named, open_runner
from bench.machine import Machine
from bench.stats import Summary
from bench.timing import time_calls
from ensemble_contract.manifest import load_manifest

RESULT_MARKER = "BENCH-RESULT "


class MeasureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: Path
    rotation: tuple[str, ...] = Field(min_length=1, description="Runner names timed in turn, one call each.")
    warmup: int = Field(ge=0)
    runs: int = Field(ge=1)
    max_seconds: float = Field(gt=0)
    fused_file: Path | None = Field(None, description="Replaces ensemble.onnx for the fused-* runners.")
    service_allow_spinning: bool | None = Field(None, description="service:<mode> runners; None: service default.")


class Measurement(BaseModel):
    spec: MeasureSpec
    machine: Machine
    results: dict[str, Summary]


def input_batch(model_dir: Path) -> Feeds:
    """A batch of one that fits the model's signature."""
    return load_manifest(model_dir, verify_files=False).example_inputs()


def open_runners(spec: MeasureSpec) -> dict[str, Runner]:
    names = list(dict.fromkeys(spec.rotation))
    service = [n for n in names if n.startswith("service:")]
    runners: dict[str, Runner] = {}
    if service:
        from bench.service_runtime import open_service_runners  # imports the service only when asked

        runners |= open_service_runners(spec.model_dir, service, spec.service_allow_spinning)
    for name in names:
        if name not in runners:
            runners[name] = open_runner(spec.model_dir, config_named(name), spec.fused_file)
    return runners


def measure(spec: MeasureSpec) -> Measurement:
    runners = open_runners(spec)
    batch = input_batch(spec.model_dir)
    calls = [lambda runner=runners[name]: runner(batch) for name in spec.rotation]
    samples = time_calls(calls, warmup=spec.warmup, runs=spec.runs, max_seconds=spec.max_seconds)
    per_name: dict[str, list[float]] = {}
    for name, durations in zip(spec.rotation, samples, strict=True):
        per_name.setdefault(name, []).extend(durations)
    results = {name: Summary.of(durations) for name, durations in per_name.items()}
    return Measurement(spec=spec, machine=Machine.current(), results=results)


def main() -> int:
    spec = MeasureSpec.model_validate_json(sys.stdin.read())
    print(RESULT_MARKER + measure(spec).model_dump_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
