"""Checks with ONNX Runtime that the fused graph computes what ensemble_contract.combine computes from its members."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ensemble_contract.combine import Combination, Rule, combine
from ensemble_contract.tolerance import relative_difference, tolerance_of

Feeds = Mapping[str, np.ndarray]


class FusedMismatchError(AssertionError):
    """The fused graph's outputs differ from the reference combination of its members': the build must fail."""


def cpu_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def run_in_batches(
    session: ort.InferenceSession, feeds: Feeds, outputs: Sequence[str] | None = None, batch: int = 64
) -> dict[str, np.ndarray]:
    """Runs `session` over `feeds` in chunks of the first axis; its outputs, concatenated, by name."""
    names = list(outputs or [o.name for o in session.get_outputs()])
    rows = len(next(iter(feeds.values())))
    chunks = [session.run(names, {k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, rows, batch)]
    return {name: np.concatenate(parts) for name, parts in zip(names, zip(*chunks, strict=True), strict=True)}


def check_fused_matches_members(
    fused: Path,
    members: Sequence[Path],
    combinations: Sequence[Combination],
    weights: Sequence[float] | None,
    feeds: Feeds,
    batch: int = 64,
) -> float:
    """Returns the largest relative difference found; raises FusedMismatchError beyond the tolerance."""
    names = [c.output for c in combinations]
    member_outputs = [run_in_batches(cpu_session(m), feeds, names, batch) for m in members]
    expected = combine(member_outputs, combinations, weights)
    got = run_in_batches(cpu_session(fused), feeds, list(expected), batch)
    votes = {c.output for c in combinations if c.rule is Rule.VOTE}
    worst = 0.0
    for name, value in expected.items():
        if got[name].shape != value.shape or got[name].dtype != value.dtype:
            raise FusedMismatchError(
                f"fused output {name!r} is {got[name].dtype} {got[name].shape}, expected {value.dtype} {value.shape}"
            )
        if name in votes:
            if not np.array_equal(got[name], value):
                raise FusedMismatchError(f"fused vote {name!r} differs from the members' majority")
            continue
        difference = relative_difference(got[name], value)
        if difference > tolerance_of(value.dtype):
            raise FusedMismatchError(f"fused output {name!r} differs from the members' combination by {difference:.2e}")
        worst = max(worst, difference)
    return worst
