"""How close two computations of the same outputs must be: the fused graph and its members' combination when the
build checks it (model_build.verify), another engine and ONNX Runtime when the service chooses one (app.engine).

A float output agrees when |got - expected| <= tolerance * max(1, |expected|) everywhere; anything else (votes,
labels) only when equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

TOLERANCE = {"FP16": 1e-2, "FP32": 1e-4, "FP64": 1e-4}


def tolerance_of(dtype: np.dtype) -> float:
    """The tolerance of a float datatype (FP64's for any float but FP16 and FP32)."""
    return TOLERANCE[{np.float16: "FP16", np.float32: "FP32"}.get(dtype.type, "FP64")]


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The largest |got - expected| / max(1, |expected|) of two float arrays of one shape."""
    reference = expected.astype(np.float64)
    return float((np.abs(got - reference) / np.maximum(1, np.abs(reference))).max(initial=0))


def disagreement(
    got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], tolerance: float | None = None
) -> tuple[float, str | None]:
    """The largest relative difference of the float outputs, and why `got` disagrees with `expected` (None: it
    agrees). `tolerance` (a manifest's) replaces the datatypes' own."""
    worst = 0.0
    for name, value in expected.items():
        other = got[name]
        if other.shape != value.shape or other.dtype != value.dtype:
            return math.inf, f"{name} is {other.dtype} {list(other.shape)}, not {value.dtype} {list(value.shape)}"
        if value.dtype.kind != "f":
            if not np.array_equal(other, value):
                return math.inf, f"{name} differs"
            continue
        difference, allowed = relative_difference(other, value), tolerance or tolerance_of(value.dtype)
        if not difference <= allowed:  # NaN included
            return difference, f"{name} differs by {difference:.1e}, beyond the tolerance {allowed:.0e}"
        worst = max(worst, difference)
    return worst, None
