"""int8 versions of the fused graph (ONNX Runtime's dynamic and static QDQ quantisation), scored on the
held-out set and timed next to fp32.

Static quantisation calibrates on shapes images from training seeds (never the held-out ones).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from pydantic import BaseModel

from app.manifest import INPUT_NAME, InputSpec, Metrics, load_manifest
from bench.isolated import measure_isolated
from bench.stats import Summary
from bench.timing import Budget
from bench.worker import MeasureSpec
from model_build.evaluate import score
from model_build.shapes import held_out_set, make_batch
from model_build.verify import run_in_batches

LATENCY_CONFIGS = ("fused-default", "fused-nospin")
MAX_ACCURACY_LOSS = 0.01  # one point of mean label accuracy


class Variant(BaseModel):
    name: str
    file: str
    size_bytes: int
    metrics: Metrics
    latency: dict[str, Summary]


class ImagesReader(CalibrationDataReader):
    """Feeds calibration images one at a time, as batch-1 inputs."""

    def __init__(self, images: np.ndarray) -> None:
        self._inputs: Iterator[np.ndarray] = iter(images[i : i + 1] for i in range(len(images)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._inputs, None)
        return None if batch is None else {INPUT_NAME: batch}


def _single_opset_per_domain(source: Path, target: Path) -> Path:
    """A copy whose opset_import lists each domain once (the quantiser refuses repeats, which fusion leaves)."""
    model = onnx.load(source)
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, v) for domain, v in versions.items())
    onnx.save(model, target)
    return target


def quantize(fp32: Path, spec: InputSpec, out: Path, calibration_images: int) -> dict[str, Path]:
    """Writes OUT/ensemble.int8-dynamic.onnx and OUT/ensemble.int8-static.onnx; returns them by variant name."""
    out.mkdir(parents=True, exist_ok=True)
    prepared = out / "ensemble.prepared.onnx"
    # ONNX's own shape inference only: onnxruntime's symbolic one gives up on ReduceMax with axes as an input
    # (opset 18+), which the classification head's global max pooling exports to.
    single_opset = _single_opset_per_domain(fp32, out / "ensemble.opsets.onnx")
    quant_pre_process(str(single_opset), str(prepared), skip_symbolic_shape=True)
    dynamic, static = out / "ensemble.int8-dynamic.onnx", out / "ensemble.int8-static.onnx"
    quantize_dynamic(prepared, dynamic, weight_type=QuantType.QUInt8)
    calibration = spec.normalise(make_batch(range(calibration_images), spec.height).images)
    quantize_static(
        prepared,
        static,
        ImagesReader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {"int8-dynamic": dynamic, "int8-static": static}


def held_out_metrics(path: Path, spec: InputSpec, images: int) -> Metrics:
    test = held_out_set(spec.height, images)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    class_probs, mask_probs = run_in_batches(session, spec.normalise(test.images))[:2]
    return score(class_probs, mask_probs, test)


def run(
    model_dir: Path,
    out: Path,
    budget: Budget,
    calibration_images: int,
    test_images: int | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> list[Variant]:
    """fp32 and each int8 variant: held-out metrics, and latency per configuration, each in its own process."""
    manifest = load_manifest(model_dir)
    images = test_images or (manifest.ensemble_metrics.images if manifest.ensemble_metrics else 500)
    fp32 = model_dir / manifest.ensemble.path
    files = {"fp32": fp32, **quantize(fp32, manifest.input, out, calibration_images)}
    variants = []
    for name, path in files.items():
        latency = {}
        for config in LATENCY_CONFIGS:
            spec = MeasureSpec(
                model_dir=model_dir,
                rotation=(config,),
                warmup=budget.warmup,
                runs=budget.runs,
                max_seconds=budget.max_seconds,
                fused_file=None if name == "fp32" else path.resolve(),
            )
            latency[config] = measure_isolated(spec).results[config]
        metrics = held_out_metrics(path, manifest.input, images)
        variants.append(
            Variant(name=name, file=str(path), size_bytes=path.stat().st_size, metrics=metrics, latency=latency)
        )
        log(
            f"[quant] {name:<13} mean label accuracy {metrics.mean_label_accuracy:.4f}, "
            + ", ".join(f"{c} {s.brief()}" for c, s in latency.items())
        )
    return variants
