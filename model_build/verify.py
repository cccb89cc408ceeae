"""Checks with ONNX Runtime that the fused graph computes exactly the mean of its members."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.manifest import CLASS_PROBS, INPUT_NAME, MASK_PROBS, MEMBER_CLASS_PROBS

TOLERANCE = 1e-4


class FusedMismatchError(AssertionError):
    """The fused graph's outputs differ from the mean of its members': the build must fail."""


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_in_batches(session: ort.InferenceSession, images: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """Runs `session` over NCHW float inputs in chunks; returns its outputs concatenated along the batch."""
    chunks = [session.run(None, {INPUT_NAME: images[i : i + batch]}) for i in range(0, len(images), batch)]
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def check_fused_matches_members(fused: Path, members: Sequence[Path], inputs: np.ndarray) -> float:
    """Returns the largest absolute difference found; raises FusedMismatchError above TOLERANCE."""
    fused_session = cpu_session(fused)
    names = [o.name for o in fused_session.get_outputs()]
    got = dict(zip(names, run_in_batches(fused_session, inputs), strict=True))
    per_member = [
        dict(zip((CLASS_PROBS, MASK_PROBS), run_in_batches(cpu_session(m), inputs)[:2], strict=True)) for m in members
    ]
    expected = {
        CLASS_PROBS: np.mean([m[CLASS_PROBS] for m in per_member], axis=0),
        MASK_PROBS: np.mean([m[MASK_PROBS] for m in per_member], axis=0),
        MEMBER_CLASS_PROBS: np.stack([m[CLASS_PROBS] for m in per_member], axis=1),
    }
    worst = 0.0
    for name, value in expected.items():
        if got[name].shape != value.shape:
            raise FusedMismatchError(f"fused output {name!r} has shape {got[name].shape}, expected {value.shape}")
        difference = float(np.abs(got[name] - value).max())
        if difference > TOLERANCE:
            raise FusedMismatchError(f"fused output {name!r} differs from the members' by {difference:.2e}")
        worst = max(worst, difference)
    return worst
