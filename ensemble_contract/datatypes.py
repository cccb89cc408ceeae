"""Tensor element types, named as the Open Inference Protocol names them, with their numpy and ONNX Runtime forms."""

from __future__ import annotations

from typing import Literal

import numpy as np

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
]

NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_BY_NUMPY = {dtype: name for name, dtype in NUMPY.items()}
# ONNX Runtime's NodeArg.type strings.
_ORT_NAMES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


class UnsupportedDatatype(ValueError):
    """A tensor type outside the table above (strings, bfloat16, sequences, maps)."""


def of_numpy(dtype: np.dtype | type) -> Datatype:
    try:
        return _BY_NUMPY[np.dtype(dtype)]  # type: ignore[return-value]
    except (KeyError, TypeError):
        raise UnsupportedDatatype(f"element type {dtype} is not supported; supported: {', '.join(NUMPY)}") from None


def of_onnxruntime(type_name: str) -> Datatype:
    try:
        return _ORT_NAMES[type_name]  # type: ignore[return-value]
    except KeyError:
        raise UnsupportedDatatype(f"type {type_name} is not supported; supported: {', '.join(NUMPY)}") from None


def is_floating(datatype: str) -> bool:
    return datatype.startswith("FP")


def is_integer(datatype: str) -> bool:
    return datatype.startswith(("INT", "UINT"))
