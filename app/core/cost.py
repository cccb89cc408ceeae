"""What one inference request costs in memory, estimated from its header before the work it describes.

The figures below were measured on this service's own request path (the resident memory a v2 JSON request of
48x48 images and its response add); app.core.memory holds what they add up to against MAX_REQUEST_BYTES and the budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.errors import PayloadTooLarge
from ensemble_contract.signature import DYNAMIC, Signature

BODY_COPIES = 2  # a body is held as the chunks it arrived in, then joined
OBJECTS_PER_TENSOR_BYTES = 2048  # what one tensor of a gRPC message becomes in Python: its protobuf wrappers, header
INPUT_COPIES = 2  # an input array, and its copy in the stacked inputs of a batch it runs in
JSON_OUTPUT_BYTES_PER_ELEMENT = 56  # a number of a JSON response: its array element (8 at most) and its text (24 at
# most: orjson wrote 10-14 per float32), twice, the body then what the transport has not sent yet
BINARY_OUTPUT_COPIES = 4  # an output array, its little-endian bytes, the body they are joined into, the transport's
DECODED_BYTES_PER_PIXEL = 16  # decoded RGBA, its RGB conversion, the upright copy, the array: 4 + 3 + 3 + 3, rounded up
USE_BINARY = "; ask for binary tensor data instead (parameters.binary_data_output: true), or for fewer rows or outputs"


@dataclass(frozen=True)
class CostModel:
    """The costs of requests to one model: its signature, MAX_BATCH_ROWS, and ONNX Runtime's working memory per
    input element, measured at start-up (EnsembleRuntime.working_bytes_per_element)."""

    signature: Signature
    max_rows: int
    working_bytes_per_element: float
    elements_per_row: int  # of the inputs, at the size of the warm-up's (an image model's input size)

    def rows(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """The request's rows (the first dimension of its inputs whose first dimension is dynamic; 1 when none
        is); PayloadTooLarge beyond MAX_BATCH_ROWS."""
        specs = {name: self.signature.input(name) for name in shapes}
        batched = [shapes[name][0] for name, spec in specs.items() if spec and spec.batched and shapes[name]]
        rows = max(batched, default=1)
        if rows > self.max_rows:
            raise PayloadTooLarge(
                f"the request has {rows} rows, more than MAX_BATCH_ROWS ({self.max_rows}): split it into requests "
                f"of {self.max_rows} rows at most"
            )
        return rows

    @property
    def largest_working_bytes(self) -> int:
        """The working memory of a request of MAX_BATCH_ROWS rows: what ONNX Runtime's arena may keep."""
        return self.working_bytes(self.max_rows * self.elements_per_row)

    def working_bytes(self, input_elements: int) -> int:
        """ONNX Runtime's activations for inputs of this many elements (their count scales them for a network)."""
        return math.ceil(input_elements * self.working_bytes_per_element)

    def output_bytes(self, rows: int, outputs: Mapping[str, bool]) -> int:
        """The outputs asked for (name -> as binary data), at `rows` rows, in the response's encoding. Dimensions
        other than the first that are dynamic count as 1 here: `encoded_bytes` measures the real outputs."""
        total = 0
        for name, binary in outputs.items():
            spec = self.signature.output(name)
            if spec is None or spec.shape is None:
                continue
            dims = [d for d in spec.shape[1:] if d != DYNAMIC] if spec.batched else list(spec.shape)
            elements = (rows if spec.batched else 1) * math.prod(dims)
            total += elements * _bytes_per_element(spec.dtype.itemsize, binary)
        return total

    def request_bytes(self, shapes: Mapping[str, Sequence[int]], outputs: Mapping[str, bool]) -> int:
        """A tensor request from its header: its input arrays (shapes as declared; inputs the model does not have
        are refused later) and their copy in a batch, ONNX Runtime's working memory for them, its encoded outputs.
        PayloadTooLarge past MAX_BATCH_ROWS."""
        rows = self.rows(shapes)
        inputs = {name: (math.prod(max(0, d) for d in dim), self.signature.input(name)) for name, dim in shapes.items()}
        input_bytes = sum(elements * spec.dtype.itemsize for elements, spec in inputs.values() if spec is not None)
        elements = sum(elements for elements, _ in inputs.values())
        return input_bytes * INPUT_COPIES + self.working_bytes(elements) + self.output_bytes(rows, outputs)


def encoded_bytes(arrays: Mapping[str, tuple[int, int]], outputs: Mapping[str, bool]) -> int:
    """The real outputs' size in the response's encoding: name -> (elements, item size) of each array."""
    return sum(elements * _bytes_per_element(itemsize, outputs[name]) for name, (elements, itemsize) in arrays.items())


def message_bytes(message_size: int, tensors: int) -> int:
    """A gRPC message once received and read: its bytes, and the objects its tensors (inputs and outputs asked for)
    become, each bounded whatever the message says of them."""
    return message_size * BODY_COPIES + tensors * OBJECTS_PER_TENSOR_BYTES


def decode_bytes(width: int, height: int) -> int:
    return width * height * DECODED_BYTES_PER_PIXEL


def _bytes_per_element(itemsize: int, binary: bool) -> int:
    return itemsize * BINARY_OUTPUT_COPIES if binary else JSON_OUTPUT_BYTES_PER_ELEMENT
