"""How the members' outputs become the ensemble's: the reference the fused graph is checked against and the
function the separate modes run.

    mean  floating outputs: the members' (weighted) mean
    vote  integer outputs (class labels): the (weighted) majority; a tie goes to the smallest label

Each combined floating output may also be given stacked, `<output>_members` [N, M, ...], for per-member answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict

MEMBERS_SUFFIX = "_members"
# Weighted vote counts are float32 sums: counts within this of the largest tie with it.
VOTE_TIE_TOLERANCE = 1e-6


class Rule(StrEnum):
    MEAN = "mean"
    VOTE = "vote"


class Combination(BaseModel):
    """One output of the members and how the ensemble combines it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str
    rule: Rule
    stack_members: bool = False

    @property
    def members_output(self) -> str | None:
        """The stacked per-member output's name, when there is one."""
        return self.output + MEMBERS_SUFFIX if self.stack_members else None


def normalised_weights(weights: Sequence[float] | None, members: int) -> np.ndarray:
    """Weights summing to one (equal when None), float64."""
    w = np.ones(members) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (members,) or not np.all(np.isfinite(w) & (w > 0)):
        raise ValueError(
            f"give one positive, finite weight per member ({members}), got {[float(x) for x in np.atleast_1d(w)]}"
        )
    return w / w.sum()


def combine(
    member_outputs: Sequence[Mapping[str, np.ndarray]],
    combinations: Sequence[Combination],
    weights: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """The ensemble's outputs from each member's, by name, in the order of `combinations`."""
    w = normalised_weights(weights, len(member_outputs))
    combined: dict[str, np.ndarray] = {}
    for combination in combinations:
        stacked = np.stack([outputs[combination.output] for outputs in member_outputs], axis=1)
        if combination.rule is Rule.MEAN:
            combined[combination.output] = weighted_mean(stacked, w, equal=weights is None)
        else:
            combined[combination.output] = majority_vote(stacked, w)
        if combination.members_output is not None:
            combined[combination.members_output] = stacked
    return combined


def weighted_mean(stacked: np.ndarray, weights: np.ndarray, *, equal: bool) -> np.ndarray:
    """stacked [N, M, ...] -> [N, ...] in the members' dtype."""
    if equal:
        return stacked.mean(axis=1, dtype=np.float32 if stacked.dtype == np.float16 else None).astype(stacked.dtype)
    shaped = weights.astype(stacked.dtype).reshape((1, -1) + (1,) * (stacked.ndim - 2))
    return (stacked * shaped).sum(axis=1).astype(stacked.dtype)


def majority_vote(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """stacked [N, M, ...] integer labels -> [N, ...]: the label with the largest (weighted) count, the smallest
    label among ties. Computed as the fused graph computes it (float32 counts)."""
    agree = stacked[:, :, np.newaxis] == stacked[:, np.newaxis, :]  # [N, M, M, ...]
    shaped = weights.astype(np.float32).reshape((1, 1, -1) + (1,) * (stacked.ndim - 2))
    counts = (agree.astype(np.float32) * shaped).sum(axis=2)  # [N, M, ...]: each member's label's votes
    best = counts.max(axis=1, keepdims=True)
    losers = counts < best - np.float32(VOTE_TIE_TOLERANCE)
    return np.where(losers, np.iinfo(stacked.dtype).max, stacked).min(axis=1).astype(stacked.dtype)
