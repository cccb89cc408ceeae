"""The Open Inference Protocol's binary tensor data extension: a JSON header, then the tensors' raw bytes.

A request with `Inference-Header-Content-Length: N` carries N bytes of JSON, then the binary data of the inputs
whose parameters give `binary_data_size`, in the order of the inputs. Outputs are sent the same way when the
request asks (`binary_data: true` on an output, or `binary_data_output: true` on the request), which is what
tritonclient.http does by default. Elements are little-endian, row-major; BOOL is one byte each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import numpy as np
import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.core.cost import json_parse_bytes
from app.errors import BadRequest
from app.http.deps import get_lease
from ensemble_contract.datatypes import NUMPY, of_numpy
from ensemble_contract.signature import TensorSpec

BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_BODY_STATE = "binary_tensor_data"


class BinaryTensors(APIRoute):
    """Reads a tensor request's body and splits a binary-extension one: the route parses the JSON (the header) as
    usual, and finds the bytes after it in request.state.binary_tensor_data (b"" for plain JSON). Before the JSON is
    parsed, the memory it will take as Python objects is reserved on the request's lease (request.state.lease):
    a JSON body too large for MAX_REQUEST_BYTES is refused with 413 before it is parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_binary(request: Request) -> Response:
            declared = request.headers.get(BINARY_HEADER)
            body = await request.body()
            header, binary = body, b""
            if declared is not None:
                if not declared.isdigit() or int(declared) > len(body):
                    raise BadRequest(f"{BINARY_HEADER} must be the JSON header's length, at most {len(body)}")
                header, binary = body[: int(declared)], body[int(declared) :]
            if header:  # GET requests under /v2 have none
                advice = "" if declared is not None else f"; send the tensors as binary data ({BINARY_HEADER})"
                get_lease(request).reserve(json_parse_bytes(header), "its JSON, parsed", advice=advice)

            async def receive_header() -> dict[str, Any]:
                return {"type": "http.request", "body": header, "more_body": False}

            setattr(request.state, BINARY_BODY_STATE, binary)
            headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(header)).encode())]
            return await handle(Request(request.scope | {"headers": headers}, receive_header))

        return handle_binary


class BinaryInputs:
    """Hands out the binary part of a request, input by input, checking each one's size against its shape."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def take(self, name: str, size: object, shape: list[int], spec: TensorSpec) -> np.ndarray:
        dtype = NUMPY[spec.datatype].newbyteorder("<")
        needed = math.prod(shape) * dtype.itemsize
        if not isinstance(size, int) or size != needed:
            raise BadRequest(f"input {name!r}: {BINARY_DATA_SIZE} must be {needed} for shape {shape}, got {size!r}")
        if self._offset + size > len(self._data):
            raise BadRequest(
                f"input {name!r}: the body has {len(self._data) - self._offset} binary bytes left, not {size}"
            )
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return np.frombuffer(chunk, dtype=dtype).astype(NUMPY[spec.datatype]).reshape(shape)

    def check_all_taken(self) -> None:
        if self._offset != len(self._data):
            raise BadRequest(f"the body has {len(self._data) - self._offset} binary bytes that no input claims")


def little_endian_bytes(array: np.ndarray) -> bytes:
    """An output's elements as the protocol sends them raw (binary tensor data, gRPC's raw_output_contents)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def infer_response(header: dict[str, Any], arrays: Mapping[str, np.ndarray], outputs: Mapping[str, bool]) -> Response:
    """The inference response: `header` (model name, id, parameters) with an entry per output asked for, JSON
    numbers or, for those asked as binary data, their binary_data_size, followed by their bytes. orjson writes the
    arrays' numbers straight from numpy, without a Python object per element."""
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
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(chunks), media_type="application/octet-stream", headers={BINARY_HEADER: str(len(head))}
    )
