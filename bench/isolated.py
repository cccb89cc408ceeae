"""Runs `bench.worker` in a fresh process per configuration and returns what it measured."""

from __future__ import annotations

import subprocess
import sys

from bench.worker import RESULT_MARKER, Measurement, MeasureSpec

START_UP_ALLOWANCE_S = 120.0  # imports, session creation and warm-up, on a busy machine


class MeasureError(RuntimeError):
    """A worker failed or ran out of time."""


def measure_isolated(spec: MeasureSpec) -> Measurement:
    timeout = spec.max_seconds * 2 + START_UP_ALLOWANCE_S
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.worker"],
            input=spec.model_dump_json(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{list(spec.rotation)} on {spec.model_dir}: no result within {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise MeasureError(f"{list(spec.rotation)} on {spec.model_dir} failed (exit {done.returncode}):\n{tail}")
    return Measurement.model_validate_json(lines[-1].removeprefix(RESULT_MARKER))
