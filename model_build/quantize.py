"""int8 versions of the fused graph with onnxruntime.quantization: static QDQ (what the build ships when it
keeps the accuracy) and dynamic (which the benchmark compares against).

Static quantisation calibrates on shapes images drawn from training seeds, never the held-out ones.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from app.manifest import INPUT_NAME, InputSpec, Metrics
from model_build.shapes import make_batch


class _ImagesReader(CalibrationDataReader):
    """Feeds calibration images one at a time, as batch-1 inputs."""

    def __init__(self, images: np.ndarray) -> None:
        self._inputs: Iterator[np.ndarray] = iter(images[i : i + 1] for i in range(len(images)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._inputs, None)
        return None if batch is None else {INPUT_NAME: batch}


def _prepared(fp32: Path, work: Path) -> Path:
    """The graph with one opset per domain (the quantiser refuses the repeats fusion leaves), shape-inferred.

    ONNX's own shape inference only: onnxruntime's symbolic one gives up on ReduceMax with axes as an input
    (opset 18+), which the classification head's global max pooling exports to."""
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


def quantize_static_int8(fp32: Path, target: Path, spec: InputSpec, calibration_images: int) -> Path:
    """Per-channel int8 weights, uint8 activations, QDQ format, calibrated on `calibration_images` images."""
    calibration = spec.normalise(make_batch(range(calibration_images), spec.height).images)
    with tempfile.TemporaryDirectory() as work:
        quantize_static(
            _prepared(fp32, Path(work)),
            target,
            _ImagesReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return target


def quantize_dynamic_int8(fp32: Path, target: Path) -> Path:
    """uint8 weights; activations quantised at run time."""
    with tempfile.TemporaryDirectory() as work:
        quantize_dynamic(_prepared(fp32, Path(work)), target, weight_type=QuantType.QUInt8)
    return target


def accuracy_loss(fp32: Metrics, int8: Metrics) -> float:
    """Mean label accuracy lost by quantising, as a fraction (0.01 is one point); negative if it gained."""
    return fp32.mean_label_accuracy - int8.mean_label_accuracy
