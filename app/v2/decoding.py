"""A v2 REST request's JSON, decoded by type: into the protocol's fields and each input's data as numbers of its
datatype, by msgspec, so that what a body becomes in memory is bounded by what it is, whatever it holds.

A string where a number goes, an object, a nesting deeper than the input's shape or a number past its datatype's
range is refused while decoding (400, naming the input), before it becomes anything bigger than its text: nothing
is decoded into an untyped tree first. Decoding takes at most DECODED_BYTES_PER_BODY_BYTE bytes per byte of the
JSON (tests/test_hostile_bodies.py measures it on hostile bodies), which the request reserves before it starts.

Fast path: a request whose inputs are all floating and flat is decoded in one pass, its data straight into lists of
floats. Any other (nested data, integer or boolean inputs) is decoded again with each input's data kept as its raw
JSON text, which `JsonData` decodes once the input's header has been checked against the model's signature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Generic, TypeVar

import msgspec
import numpy as np

from app.errors import BadRequest
from ensemble_contract.datatypes import NUMPY, is_floating
from ensemble_contract.modes import describe_modes
from ensemble_contract.signature import TensorSpec

# What one byte of JSON can become, at most: a flat list of one-digit floats is a float object and its list slot
# (32 bytes) for every two bytes of "0,"; one-element lists nested as deep as a shape allows cost about as much.
# tests/test_hostile_bodies.py checks it on hostile bodies.
DECODED_BYTES_PER_BODY_BYTE = 24
Parameter = str | int | float | bool
Parameters = dict[str, Parameter]
WHITESPACE = b" \t\r\n"
NESTED_TOO_DEEP = "the JSON is nested deeper than any field of the protocol"
ELEMENT = {"b": bool, "i": int, "u": int, "f": float}
BINARY_DATA_SIZE = "binary_data_size"  # the input parameter of the binary tensor data extension
DATA = f"Row-major elements, flat or nested; absent when parameters.{BINARY_DATA_SIZE} is given."
KIND = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}


class RequestedOutput(msgspec.Struct, kw_only=True):
    name: str
    parameters: Parameters | None = None


class InputFields(msgspec.Struct, kw_only=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None


class RawInput(InputFields, kw_only=True):
    data: Annotated[msgspec.Raw, msgspec.Meta(description=DATA)] | msgspec.UnsetType = msgspec.UNSET


class FlatFloatInput(InputFields, kw_only=True):
    data: list[float] | None = None


InputT = TypeVar("InputT", RawInput, FlatFloatInput)


class InferenceRequest(msgspec.Struct, Generic[InputT], kw_only=True):
    """The Open Inference Protocol's inference request (its JSON part, with the binary tensor data extension)."""

    id: str | None = None
    parameters: Annotated[
        Parameters | None, msgspec.Meta(description=f'{{"mode": ...}}: {describe_modes()}. Default: DEFAULT_MODE.')
    ] = None
    inputs: Annotated[list[InputT], msgspec.Meta(min_length=1)]
    outputs: Annotated[list[RequestedOutput] | None, msgspec.Meta(description="Default: every output.")] = None


EXAMPLE = {
    "id": "42",
    "parameters": {"mode": "parallel"},
    "inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.0, -2.0, 0.0]}],
    "outputs": [{"name": "probabilities"}],
}
FLAT = msgspec.json.Decoder(InferenceRequest[FlatFloatInput])
RAW = msgspec.json.Decoder(InferenceRequest[RawInput])


def decode_request(header: bytes) -> InferenceRequest[FlatFloatInput] | InferenceRequest[RawInput]:
    """The request's JSON, its fields typed; BadRequest saying what does not fit."""
    try:
        flat = FLAT.decode(header)
        if all(is_floating(tensor.datatype) for tensor in flat.inputs):
            return flat
    except msgspec.ValidationError:
        pass  # nested data, integers or booleans: decoded by each input's type below (or refused there)
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f"the body is not JSON ({exc}); numbers must be finite: NaN and Infinity are not JSON"
        ) from None
    except RecursionError:  # msgspec's own bound on nesting, which the fields' types would refuse anyway
        raise BadRequest(NESTED_TOO_DEEP) from None
    try:
        return RAW.decode(header)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"the request does not fit the protocol: {exc}") from None
    except RecursionError:
        raise BadRequest(NESTED_TOO_DEEP) from None


def request_schema() -> dict[str, Any]:
    """The request's JSON Schema, with its definitions inlined (OpenAPI resolves references from its own root)."""
    schema = msgspec.json.schema(InferenceRequest[RawInput])
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema) | {"examples": [EXAMPLE]}


@dataclass(frozen=True)
class Numbers:
    """An input's data as numbers already of its datatype's kind: JSON decoded by type, or gRPC's typed contents."""

    data: Sequence[Any] | None
    decoding_bytes: int = 0  # already decoded

    def array(self, name: str, shape: Sequence[int], spec: TensorSpec) -> np.ndarray:
        label = repr(name)
        if self.data is None:
            raise BadRequest(f"input {label} has neither data nor parameters.{BINARY_DATA_SIZE}")
        dtype = NUMPY[spec.datatype]
        try:
            with np.errstate(over="ignore"):  # a float past FP32's range becomes infinity, which is refused later
                array = np.asarray(self.data, dtype=dtype)
        except OverflowError:
            info = np.iinfo(dtype)
            raise BadRequest(f"input {label}: values out of {spec.datatype}'s range [{info.min}, {info.max}]") from None
        except (ValueError, TypeError):  # ragged nesting
            raise BadRequest(f"input {label}: data must be flat or nested in row-major order") from None
        if array.size != math.prod(shape):
            raise BadRequest(f"input {label}: shape {list(shape)} needs {math.prod(shape)} elements, got {array.size}")
        return array.reshape(shape)


@dataclass(frozen=True)
class JsonData:
    """An input's data as its raw JSON text, decoded as numbers of the input's datatype, nested at most as deep as
    its shape."""

    raw: msgspec.Raw

    @property
    def decoding_bytes(self) -> int:
        return len(self.raw) * DECODED_BYTES_PER_BODY_BYTE

    def array(self, name: str, shape: Sequence[int], spec: TensorSpec) -> np.ndarray:
        kind = NUMPY[spec.datatype].kind
        depth = _leading_brackets(memoryview(self.raw), limit=len(shape) + 1)
        if depth > max(1, len(shape)):
            raise BadRequest(f"input {name!r}: data is nested deeper than its shape {list(shape)}")
        if depth == 0 and bytes(self.raw) not in (b"", b"null"):
            raise BadRequest(f"input {name!r}: data must be a list of {KIND[kind]}, flat or nested in row-major order")
        if depth == 0:
            return Numbers(None).array(name, shape, spec)
        try:
            values = _decoder(ELEMENT[kind], depth).decode(self.raw)
        except msgspec.ValidationError as exc:
            raise BadRequest(
                f"input {name!r}: data must be {KIND[kind]}, flat or nested in row-major order ({exc})"
            ) from None
        return Numbers(values).array(name, shape, spec)


@cache
def _decoder(element: type, depth: int) -> msgspec.json.Decoder[Any]:
    nested: Any = element
    for _ in range(depth):
        nested = list[nested]
    return msgspec.json.Decoder(nested)


def _leading_brackets(text: memoryview, limit: int) -> int:
    """How deep the JSON text's first elements are nested: its opening brackets before anything else, up to limit."""
    depth = 0
    for byte in text:
        if byte == ord("["):
            depth += 1
            if depth >= limit:
                break
        elif byte not in WHITESPACE:
            break
    return depth
