"""Writing a model directory (ensemble_contract.manifest's layout): the fused graph, checked against its members,
and the int8 graph, judged before it is kept. Used by `build` (our UNets) and `fuse` (members a user brings)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from ensemble_contract.manifest import ENSEMBLE_FILE, INT8_FILE, FileEntry, Int8
from model_build.fuse import Plan, fuse
from model_build.quantize import quantize_static_int8
from model_build.verify import check_fused_matches_members

Scorer = Callable[[Path], dict[str, float]]  # a graph's scores on held-out data, higher is better


def log(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return versions


def write_ensemble(
    out: Path,
    members: Sequence[onnx.ModelProto],
    member_paths: Sequence[Path],
    fusion: Plan,
    weights: Sequence[float] | None,
    check_feeds: Mapping[str, np.ndarray],
    batch: int = 64,
) -> FileEntry:
    """Fuses the members into OUT/ensemble.onnx, and fails unless it equals the reference combination of the
    member files on `check_feeds`."""
    names = [p.stem for p in member_paths]
    fused = fuse(members, names, fusion, weights)
    onnx.helper.set_model_props(fused, {"members": ",".join(names)})
    path = out / ENSEMBLE_FILE
    onnx.save(fused, path)
    worst = check_fused_matches_members(path, member_paths, fusion.combine, weights, check_feeds, batch)
    # Named by the file alone: `fuse` writes in a staging directory that its last line ("wrote ...") replaces.
    log(f"fused {len(member_paths)} members into {ENSEMBLE_FILE}; largest relative difference {worst:.1e}")
    return FileEntry.of(out, path)


def largest_loss(fp32: Mapping[str, float], int8: Mapping[str, float]) -> float:
    """The most any score lost by quantising, as a fraction (0.01 is one point); negative if all gained."""
    return max(fp32[name] - int8[name] for name in fp32)


def write_int8(
    out: Path, calibration: Mapping[str, np.ndarray] | None, scorer: Scorer | None, max_loss: float, batch: int = 1
) -> Int8:
    """Quantises OUT/ensemble.onnx to OUT/ensemble.int8.onnx (static QDQ, calibrated on `calibration`'s rows) and
    keeps it if no score of `scorer` drops by more than `max_loss`; says why when there is none."""
    path = out / INT8_FILE
    path.unlink(missing_ok=True)
    if calibration is None:
        note = "no int8 graph: no calibration data was given (fuse --calibration inputs.npz)"
        log(note)
        return Int8(note=note)
    rows = len(next(iter(calibration.values())))
    log(f"quantising the fused graph to int8, calibrated on {rows} rows")
    quantize_static_int8(out / ENSEMBLE_FILE, path, calibration, batch)
    if scorer is None:
        log("int8 graph kept without judging it: give --eval inputs.npz with expected outputs to judge it")
        return Int8(file=FileEntry.of(out, path), note="kept without judging: no evaluation data was given")
    fp32, int8 = scorer(out / ENSEMBLE_FILE), scorer(path)
    loss = largest_loss(fp32, int8)
    scores = {f"fp32_{k}": v for k, v in fp32.items()} | {f"int8_{k}": v for k, v in int8.items()}
    verdict = (
        f"{', '.join(f'{k} {fp32[k]:.4f} -> {int8[k]:.4f}' for k in fp32)}; may lose {max_loss * 100:g} "
        "point(s) at most"
    )
    if loss > max_loss + 1e-9:  # a loss of exactly max_loss is allowed, whatever the float rounding
        log(f"int8 graph not kept: {verdict}")
        path.unlink()
        return Int8(metrics=scores, note=f"not kept: {verdict}")
    log(f"int8 graph kept: {verdict}")
    return Int8(file=FileEntry.of(out, path), metrics=scores, note=f"kept: {verdict}")
