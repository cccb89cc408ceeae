"""A tensor inference request as the data plane sees it, whatever the protocol it came in, and its checks
against the model's signature.

The fronts (the v2 REST routes, the gRPC servicer) turn their wire format into a TensorRequest with app.v2.codec:
each input's header (name, datatype, shape) and its data as a Payload that can become an array once the header
is known to fit. The data plane runs it as a TensorInference, which checks the header against the signature,
reserves the memory the request will hold, then turns the payloads into arrays: in that order, so that no element
is converted for a request that would be refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app.core.cost import USE_BINARY, encoded_bytes
from app.core.memory import Lease
from app.core.model import LoadedModel
from app.engine.runtime import Tensors
from app.errors import BadRequest
from ensemble_contract.datatypes import is_floating
from ensemble_contract.modes import Mode, ModeChoice
from ensemble_contract.signature import Signature, TensorSpec

MAX_NAMES_SHOWN = 10  # of a request's inputs in an error: what it says stays small whatever the request holds


class Payload(Protocol):
    """An input's data as it arrived (JSON numbers, raw bytes), turned into an array of the spec's type on demand;
    BadRequest saying why if it cannot be. Turning it into an array may first hold `decoding_bytes` (JSON text
    decoded into numbers), which the request reserves with its tensors."""

    @property
    def decoding_bytes(self) -> int: ...

    def array(self, name: str, shape: Sequence[int], spec: TensorSpec) -> np.ndarray: ...


@dataclass(frozen=True)
class InputHeader:
    name: str
    datatype: str
    shape: tuple[int, ...]
    payload: Payload


@dataclass(frozen=True)
class TensorRequest:
    model_name: str
    inputs: tuple[InputHeader, ...]
    outputs: Mapping[str, bool] | None  # the outputs asked for, each with whether as binary data; None: every one
    binary_outputs: bool  # for every output when `outputs` is None
    mode: ModeChoice | None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {tensor.name: tensor.shape for tensor in self.inputs}


def input_specs(request: TensorRequest, signature: Signature) -> dict[str, TensorSpec]:
    """The signature's spec of each input, once the request's inputs are checked to be the model's, with datatypes
    and shapes that fit: everything the request's header says, checked before any of its data is converted."""
    expected = {spec.name: spec for spec in signature.inputs}
    given = [tensor.name for tensor in request.inputs]
    if sorted(given) != sorted(expected):
        more = len(given) - MAX_NAMES_SHOWN
        shown = f"{given[:MAX_NAMES_SHOWN]} and {more} more" if more > 0 else given
        raise BadRequest(f"expected inputs {sorted(expected)}, got {shown}")
    for tensor in request.inputs:
        spec, name = expected[tensor.name], repr(tensor.name)
        if tensor.datatype != spec.datatype:
            raise BadRequest(f"input {name} must be {spec.datatype}, got {tensor.datatype}")
        if any(d < 1 for d in tensor.shape):
            raise BadRequest(f"input {name}: every dimension must be at least 1, got {list(tensor.shape)}")
        if not spec.fits(tensor.shape):
            raise BadRequest(f"input {name} must have shape {spec.dims} (-1: any size), got {list(tensor.shape)}")
    return expected


def asked_outputs(request: TensorRequest, signature: Signature) -> dict[str, bool]:
    """The outputs asked for (every output when none is named), each with whether it goes as binary data."""
    known = signature.output_names
    if request.outputs is None:
        return dict.fromkeys(known, request.binary_outputs)
    unknown = sorted(set(request.outputs) - set(known))
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; the model has {', '.join(known)}")
    return dict(request.outputs)


def input_arrays(request: TensorRequest, specs: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    """The inputs as arrays by name; floating inputs must be finite whatever their encoding."""
    feeds = {}
    for tensor in request.inputs:
        spec = specs[tensor.name]
        array = tensor.payload.array(tensor.name, tensor.shape, spec)
        if is_floating(spec.datatype) and not np.isfinite(array).all():
            raise BadRequest(
                f"input {tensor.name!r}: data must be finite (no NaN or infinity) and within {spec.datatype}'s range"
            )
        feeds[tensor.name] = array
    return feeds


@dataclass(frozen=True)
class TensorOutputs:
    outputs: dict[str, np.ndarray]  # the outputs asked for, in the order asked
    binary: dict[str, bool]  # whether each goes as binary data


class TensorInference:
    """A TensorRequest as the data plane runs it (a FrontRequest). Before any of its data is converted, its header
    reserves what the rest of it will hold (413 past MAX_BATCH_ROWS or MAX_REQUEST_BYTES, 503 past the memory
    budget); outputs whose dimensions the signature leaves open, reserved as one element each, reserve what they
    really hold once computed. Its answer: the outputs asked for."""

    def __init__(self, request: TensorRequest) -> None:
        self.request = request
        self.model_name: str | None = request.model_name
        self.mode = request.mode
        self._asked: dict[str, bool] = {}
        self._feeds: Tensors = {}
        self._rows = 0

    async def check(self, model: LoadedModel, lease: Lease) -> int:
        request, signature = self.request, model.manifest.signature
        self._asked = asked_outputs(request, signature)
        specs = input_specs(request, signature)
        decoding = sum(tensor.payload.decoding_bytes for tensor in request.inputs)
        needed = model.cost.request_bytes(request.shapes, self._asked) + decoding
        lease.reserve(needed, "its tensors, their inference and its outputs", advice=self._advice)
        self._feeds = input_arrays(request, specs)
        self._rows = model.cost.rows(request.shapes)
        return self._rows

    async def feeds(self, model: LoadedModel, lease: Lease) -> tuple[Tensors, float]:
        return self._feeds, 0.0  # converted before it was admitted

    async def answer(
        self, model: LoadedModel, mode: Mode, outputs: Tensors, lease: Lease
    ) -> tuple[TensorOutputs, float]:
        sizes = {name: (outputs[name].size, outputs[name].itemsize) for name in self._asked}
        foreseen = model.cost.output_bytes(self._rows, self._asked)
        unforeseen = encoded_bytes(sizes, self._asked) - foreseen
        lease.reserve(unforeseen, "its outputs, larger than the signature says", advice=self._advice)
        return TensorOutputs({name: outputs[name] for name in self._asked}, self._asked), 0.0

    @property
    def _advice(self) -> str:
        return "" if all(self._asked.values()) else USE_BINARY
