"""`python -m bench quant`: int8 versions of the fused graph (model_build.quantize, onnxruntime.quantization:
dynamic, and the static QDQ one the build ships, calibrated on training-seed images), scored on the held-out set
and timed next to fp32, each in its own process. About 2 min on 2 cores."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from bench.core import Budget, MeasureSpec, Summary, log, measure_isolated
from ensemble_contract.manifest import ImageSpec, Metrics, load_manifest
from model_build.evaluate import score_model
from model_build.quantize import quantize_dynamic_int8, quantize_static_int8
from model_build.shapes import held_out_set, make_batch

LATENCY_CONFIGS = ("fused-default", "fused-nospin")


class Variant(BaseModel):
    name: str
    file: str
    size_bytes: int
    metrics: Metrics
    latency: dict[str, Summary]


def quantize(fp32: Path, spec: ImageSpec, out: Path, calibration_images: int) -> dict[str, Path]:
    """Writes OUT/ensemble.int8-dynamic.onnx and OUT/ensemble.int8-static.onnx; returns them by variant name.
    Static calibration uses training seeds' images, as the build does."""
    out.mkdir(parents=True, exist_ok=True)
    calibration = {spec.input: spec.normalise(make_batch(range(calibration_images), spec.height).images)}
    return {
        "int8-dynamic": quantize_dynamic_int8(fp32, out / "ensemble.int8-dynamic.onnx"),
        "int8-static": quantize_static_int8(fp32, out / "ensemble.int8-static.onnx", calibration),
    }


def run(
    model_dir: Path,
    out: Path,
    budget: Budget,
    calibration_images: int,
    test_images: int | None = None,
) -> list[Variant]:
    """fp32 and each int8 variant: held-out metrics, and latency per configuration, each in its own process."""
    manifest = load_manifest(model_dir)
    if manifest.image is None or manifest.ensemble_metrics is None:
        raise ValueError(
            f"{model_dir}: bench quant scores our shapes models; use `fuse --calibration --eval` for yours"
        )
    images = test_images or manifest.ensemble_metrics.images
    fp32 = model_dir / manifest.ensemble.path
    test = held_out_set(manifest.image.height, images)
    test_inputs = manifest.image.normalise(test.images)
    files = {"fp32": fp32, **quantize(fp32, manifest.image, out, calibration_images)}
    variants = []
    for name, path in files.items():
        latency = {}
        for config in LATENCY_CONFIGS:
            fused_file = None if name == "fp32" else path.resolve()
            spec = MeasureSpec.of(model_dir, (config,), budget, fused_file=fused_file)
            latency[config] = measure_isolated(spec).results[config]
        metrics = score_model(path, test, test_inputs)
        variants.append(
            Variant(name=name, file=str(path), size_bytes=path.stat().st_size, metrics=metrics, latency=latency)
        )
        log(
            f"[quant] {name:<13} mean label accuracy {metrics.mean_label_accuracy:.4f}, "
            + ", ".join(f"{c} {s.brief()}" for c, s in latency.items())
        )
    return variants
