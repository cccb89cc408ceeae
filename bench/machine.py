"""What a result was measured on: printed with and stored in every result, since only ratios travel."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import onnxruntime
from pydantic import BaseModel


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
            cores=len(os.sched_getaffinity(0)),
            onnxruntime=onnxruntime.__version__,
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
