"""The Open Inference Protocol's binary tensor data extension: a JSON header, then the tensors' raw bytes.

A request with `Inference-Header-Content-Length: N` carries N bytes of JSON, then the binary data of the inputs
whose parameters give `binary_data_size`, in the order of the inputs. Outputs are sent the same way when the
request asks (`binary_data: true` on an output, or `binary_data_output: true` on the request), which is what
tritonclient.http does by default. Elements are little-endian, row-major; BOOL is one byte each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute

from app.errors import BadRequest
from ensemble_contract.datatypes import NUMPY
from ensemble_contract.signature import TensorSpec

BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_BODY_STATE = "binary_tensor_data"


class BinaryTensors(APIRoute):
    """Splits a binary-extension body: the route parses the JSON header as usual, and finds the bytes after it in
    request.state.binary_tensor_data (b"" when the request is plain JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_binary(request: Request) -> Response:
            declared = request.headers.get(BINARY_HEADER)
            if declared is None:
                setattr(request.state, BINARY_BODY_STATE, b"")
                return await handle(request)
            body = await request.body()
            if not declared.isdigit() or int(declared) > len(body):
                raise BadRequest(f"{BINARY_HEADER} must be the JSON header's length, at most the body's {len(body)}")
            header, binary = body[: int(declared)], body[int(declared) :]

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


def binary_response(header: dict[str, Any], binary: Mapping[str, np.ndarray]) -> Response:
    """The JSON header (the binary outputs' entries carry binary_data_size and no data), then their bytes."""
    chunks = []
    for output in header["outputs"]:
        array = binary.get(output["name"])
        if array is None:
            continue
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        output["parameters"] = {BINARY_DATA_SIZE: len(data)}
        output.pop("data", None)
        chunks.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(
        head + b"".join(chunks), media_type="application/octet-stream", headers={BINARY_HEADER: str(len(head))}
    )
