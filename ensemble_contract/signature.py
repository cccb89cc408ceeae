"""The tensors a graph takes and gives, recorded in the manifest so every side reads one description."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ensemble_contract.datatypes import NUMPY, Datatype, is_floating

DYNAMIC = -1
# Dynamic dimensions of generated inputs (the build's numeric check, the service's warm-up), after the batch.
GENERATED_DYNAMIC_SIZE = 32


class StrictModel(BaseModel):
    """The contract's models: frozen, and refusing any field they do not name (a typo in a manifest is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(StrictModel):
    """One tensor: its name, element type and shape (-1 for a dynamic dimension; None when the rank is unknown)."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: tuple[int, ...] | None

    @property
    def dtype(self) -> np.dtype:
        return NUMPY[self.datatype]

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a concrete shape is one this tensor accepts: same rank, static dims equal."""
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(
            want == DYNAMIC or have == want for have, want in zip(shape, self.shape, strict=True)
        )

    @property
    def batched(self) -> bool:
        """Whether the first dimension is dynamic: the batch (rows) dimension, which requests may stack."""
        return bool(self.shape) and self.shape[0] == DYNAMIC

    @property
    def dims(self) -> str:
        """The shape as text, -1 for dynamic dims, ? for an unknown rank."""
        return "?" if self.shape is None else "[" + ", ".join(map(str, self.shape)) + "]"

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {self.dims}"


class Signature(StrictModel):
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def generated_inputs(
    inputs: Sequence[TensorSpec], batch: int, *, sizes: Mapping[str, Sequence[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs that fit the signature: dynamic first dims get `batch`, other dynamic dims GENERATED_DYNAMIC_SIZE
    unless `sizes` gives an input's whole shape. Floats ~ N(0, 1); integers in [0, 2); booleans at random."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        if sizes and spec.name in sizes:
            shape = tuple(sizes[spec.name])
        elif spec.shape is None:
            raise ValueError(f"input {spec.name!r} has no known rank: give its shape")
        else:
            shape = tuple(
                d if d != DYNAMIC else (batch if axis == 0 else GENERATED_DYNAMIC_SIZE)
                for axis, d in enumerate(spec.shape)
            )
        if is_floating(spec.datatype):
            array = rng.normal(0, 1, shape)
        elif spec.datatype == "BOOL":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            array = rng.integers(0, 2, shape)
        feeds[spec.name] = np.ascontiguousarray(array.astype(spec.dtype))
    return feeds
