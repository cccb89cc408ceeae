"""The int8 version of a fused graph with onnxruntime.quantization: static QDQ, which the build ships when it
keeps the accuracy.

Static quantisation calibrates on inputs the caller gives: ours on shapes images drawn from training seeds,
never the held-out ones; a user's on the rows of `fuse --calibration inputs.npz`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)


class _RowsReader(CalibrationDataReader):
    """Feeds calibration inputs `batch` rows at a time (whole batches only)."""

    def __init__(self, feeds: Mapping[str, np.ndarray], batch: int) -> None:
        rows = len(next(iter(feeds.values())))
        self._rows: Iterator[dict[str, np.ndarray]] = iter(
            {name: array[i : i + batch] for name, array in feeds.items()} for i in range(0, rows - batch + 1, batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._rows, None)


def _prepared(fp32: Path, work: Path) -> Path:
    """The graph with one opset per domain (the quantiser refuses repeats), shape-inferred.

    ONNX's own shape inference only: onnxruntime's symbolic one gives up on ReduceMax with axes as an input
    (opset 18+), which our classification head's global max pooling exports to."""
    model = onnx.load(fp32)
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, v) for domain, v in versions.items())
    single_opset, prepared = work / "single-opset.onnx", work / "prepared.onnx"
    onnx.save(model, single_opset)
    quant_pre_process(str(single_opset), str(prepared), skip_symbolic_shape=True)
    return prepared


def quantize_static_int8(fp32: Path, target: Path, calibration: Mapping[str, np.ndarray], batch: int = 1) -> Path:
    """Per-channel int8 weights, uint8 activations, QDQ format, calibrated on the rows of `calibration`."""
    with tempfile.TemporaryDirectory() as work:
        quantize_static(
            _prepared(fp32, Path(work)),
            target,
            _RowsReader(calibration, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return target
