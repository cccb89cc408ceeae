"""The Open Inference Protocol's encodings, written once for both fronts: requests from REST JSON (with the binary
tensor data extension) and from gRPC messages into the data plane's TensorRequest, input data into arrays, and
outputs, metadata and parameters back into each wire format.

Binary tensor data (REST): a request with `Inference-Header-Content-Length: N` carries N bytes of JSON, then the
raw bytes of the inputs whose parameters give `binary_data_size`, in the order of the inputs; outputs go the same
way when the request asks (`binary_data` on an output, or `binary_data_output` on the request), as tritonclient.http
does by default. gRPC carries inputs as `raw_input_contents` (what tritonclient.grpc sends) or typed `contents`,
and outputs always as `raw_output_contents`. Raw elements are little-endian, row-major; BOOL is one byte each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import msgspec
import numpy as np
import orjson
from tritonclient.grpc import service_pb2 as pb

from app.core.dataplane import Inferred
from app.core.tensors import InputHeader, TensorOutputs, TensorRequest
from app.errors import BadRequest
from app.v2.decoding import BINARY_DATA_SIZE, FlatFloatInput, InferenceRequest, JsonData, Numbers, RawInput
from ensemble_contract.datatypes import NUMPY, of_numpy
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import ModeChoice
from ensemble_contract.signature import TensorSpec

SERVER_NAME = "onnx-ensemble-serving"
SERVER_VERSION = version(SERVER_NAME)
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["binary_tensor_data", "model_repository"]
BINARY_HEADER = "Inference-Header-Content-Length"
# The typed field of gRPC's InferTensorContents that carries each datatype (FP16 has none: raw contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


@dataclass(frozen=True)
class RawBytes:
    """An input's data as raw little-endian bytes: binary tensor data, or gRPC's raw_input_contents."""

    data: memoryview
    decoding_bytes: int = 0  # a view of the body, which is reserved already

    def array(self, name: str, shape: Sequence[int], spec: TensorSpec) -> np.ndarray:
        dtype = NUMPY[spec.datatype].newbyteorder("<")
        needed = math.prod(shape) * dtype.itemsize
        if len(self.data) != needed:
            raise BadRequest(f"input {name!r}: {needed} bytes of data for shape {list(shape)}, got {len(self.data)}")
        return np.frombuffer(self.data, dtype=dtype).astype(NUMPY[spec.datatype]).reshape(shape)


def requested_mode(parameters: Mapping[str, Any] | None) -> ModeChoice | None:
    mode = (parameters or {}).get("mode")
    if mode is None:
        return None
    try:
        return ModeChoice(mode)
    except ValueError:
        raise BadRequest(f"parameter mode must be one of {[m.value for m in ModeChoice]}, got {mode!r}") from None


def rest_request(
    model_name: str, request: InferenceRequest[FlatFloatInput] | InferenceRequest[RawInput], binary: bytes
) -> TensorRequest:
    """A REST request (its JSON decoded by app.v2.decoding, and the binary tensor data after it) as the data plane's
    request."""
    data, offset, inputs = memoryview(binary), 0, []
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get(BINARY_DATA_SIZE)
        if size is None:
            elements = tensor.data
            payload: Numbers | JsonData | RawBytes = (
                JsonData(elements) if isinstance(elements, msgspec.Raw) else Numbers(elements or None)
            )
        else:
            dtype = NUMPY.get(tensor.datatype)  # an unknown datatype is refused with the rest of the header
            needed = math.prod(tensor.shape) * dtype.itemsize if dtype is not None else size
            if not isinstance(size, int) or size != needed:
                raise BadRequest(
                    f"input {tensor.name!r}: {BINARY_DATA_SIZE} must be {needed} for shape {tensor.shape}, got {size!r}"
                )
            if offset + size > len(data):
                left = len(data) - offset
                raise BadRequest(f"input {tensor.name!r}: the body has {left} binary bytes left, not {size}")
            payload, offset = RawBytes(data[offset : offset + size]), offset + size
        inputs.append(InputHeader(tensor.name, tensor.datatype, tuple(tensor.shape), payload))
    if offset != len(data):
        raise BadRequest(f"the body has {len(data) - offset} binary bytes that no input claims")
    parameters = request.parameters or {}
    outputs = None
    if request.outputs:
        every = bool(parameters.get("binary_data_output", False))
        outputs = {o.name: bool((o.parameters or {}).get("binary_data", every)) for o in request.outputs}
    binary_outputs = bool(parameters.get("binary_data_output", False))
    return TensorRequest(model_name, tuple(inputs), outputs, binary_outputs, requested_mode(parameters))


def grpc_request(request: pb.ModelInferRequest) -> TensorRequest:
    """A gRPC request as the data plane's request; its outputs always go as raw_output_contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    if not request.inputs:
        raise BadRequest("the request has no inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        if raw:
            payload: Numbers | RawBytes = RawBytes(memoryview(raw[i]))
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise BadRequest(f"input {tensor.name!r}: {tensor.datatype} goes in raw_input_contents")
            payload = Numbers(getattr(tensor.contents, field))
        inputs.append(InputHeader(tensor.name, tensor.datatype, tuple(tensor.shape), payload))
    parameters = {
        name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in request.parameters.items()
    }
    outputs = dict.fromkeys((o.name for o in request.outputs), True) or None
    return TensorRequest(request.model_name, tuple(inputs), outputs, True, requested_mode(parameters))


def little_endian_bytes(array: np.ndarray) -> bytes:
    """An output's elements as the protocol sends them raw (binary tensor data, gRPC's raw_output_contents)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def rest_response(
    header: dict[str, Any], arrays: Mapping[str, np.ndarray], outputs: Mapping[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """The REST inference response's body and headers: `header` (model name, id, parameters) with an entry per
    output asked for, JSON numbers or, for those asked as binary data, their binary_data_size, followed by their
    bytes. orjson writes the arrays' numbers straight from numpy, without a Python object per element."""
    entries, chunks = [], []
    for name, binary in outputs.items():
        array = arrays[name]
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": of_numpy(array.dtype)}
        if binary:
            chunks.append(little_endian_bytes(array))
            entry["parameters"] = {BINARY_DATA_SIZE: len(chunks[-1])}
        else:
            entry["data"] = np.ascontiguousarray(array).ravel()
        entries.append(entry)
    head = orjson.dumps(header | {"outputs": entries}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream", BINARY_HEADER: str(len(head))}


def response_parameters(result: Inferred[TensorOutputs]) -> dict[str, str | int]:
    """What both fronts tell of how a response was computed: the mode, and the rows of the inference it ran in
    (its own and those of the requests batched with it)."""
    return {"mode": result.mode.value, "batch_rows": result.timing.batch_rows}


def grpc_response(result: Inferred[TensorOutputs], request_id: str) -> pb.ModelInferResponse:
    arrays = result.answer.outputs
    return pb.ModelInferResponse(
        model_name=result.manifest.name,
        id=request_id,
        parameters={name: _grpc_parameter(value) for name, value in response_parameters(result).items()},
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=name, datatype=of_numpy(a.dtype), shape=list(a.shape))
            for name, a in arrays.items()
        ],
        raw_output_contents=[little_endian_bytes(a) for a in arrays.values()],
    )


def _grpc_parameter(value: str | int) -> pb.InferParameter:
    return pb.InferParameter(string_param=value) if isinstance(value, str) else pb.InferParameter(int64_param=value)


@dataclass(frozen=True)
class TensorDescription:
    """A tensor of the model's metadata: -1 for a dynamic dimension."""

    name: str
    datatype: str
    shape: list[int]


def tensor_descriptions(manifest: Manifest) -> tuple[list[TensorDescription], list[TensorDescription]]:
    """The model's inputs and outputs, as both fronts describe them."""

    def describe(specs: Sequence[TensorSpec]) -> list[TensorDescription]:
        return [TensorDescription(spec.name, spec.datatype, list(spec.shape or [])) for spec in specs]

    return describe(manifest.signature.inputs), describe(manifest.signature.outputs)
