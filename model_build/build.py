"""The build pipeline: train members, export them, fuse them, check the fusion, score everything, write
the manifest. `build` does it from a config; `fuse_files` does the second half for members a user brings.

    OUT/members/<member>.onnx   one file per member
    OUT/ensemble.onnx           the fused graph
    OUT/ensemble.int8.onnx      the fused graph quantised to int8, if it keeps the accuracy (config.int8)
    OUT/manifest.json           app.manifest.Manifest: the contract the service reads
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from app.manifest import (
    FileEntry,
    InputSpec,
    Manifest,
    ManifestError,
    Member,
    Metrics,
    load_manifest,
)
from model_build.config import BuildConfig, Int8Config, MemberConfig
from model_build.evaluate import score_model
from model_build.export import export_member
from model_build.fuse import FusionError, fuse, signature
from model_build.quantize import accuracy_loss, quantize_static_int8
from model_build.shapes import LABELS, Batch, held_out_set
from model_build.train import train_member
from model_build.unet import UNet, parameter_count
from model_build.verify import check_fused_matches_members

RANDOM_CHECK_INPUTS = 8
ENSEMBLE_FILE = "ensemble.onnx"
INT8_FILE = "ensemble.int8.onnx"


def log(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _member_metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def is_built(path: Path, config: BuildConfig, member: MemberConfig) -> bool:
    """Whether `path` holds `member` as `config` builds it (the fingerprint its export recorded matches)."""
    return path.is_file() and _member_metadata(path).get("fingerprint") == config.member_fingerprint(member)


def _train_and_export(config: BuildConfig, member: MemberConfig, path: Path, progress_position: int) -> Path:
    """One member from seed to ONNX file; runs in a worker process when members train at once."""
    unet = UNet(member.width_scale, len(LABELS))
    unet.load_state_dict(train_member(member, config.training, progress_position))
    metadata = {
        "name": member.name,
        "width_scale": str(member.width_scale),
        "seed": str(member.seed),
        "parameters": str(parameter_count(unet)),
        "fingerprint": config.member_fingerprint(member),
        "labels": json.dumps(LABELS),
        "input": config.input_spec.model_dump_json(),
    }
    export_member(unet, path, config.training.image_size, config.opset, metadata)
    return path


def _build_members(config: BuildConfig, members_dir: Path) -> list[Path]:
    """Trains and exports the members whose file is missing or was built from another config.

    With parallel_training the members train at once in separate processes, one core each."""
    paths = [members_dir / f"{m.name}.onnx" for m in config.members]
    todo = [
        (member, path) for member, path in zip(config.members, paths, strict=True) if not is_built(path, config, member)
    ]
    if len(todo) < len(paths):
        log(f"reusing {len(paths) - len(todo)} member(s) built from the same config")
    if not todo:
        return paths
    log(f"training {len(todo)} member(s) for {config.training.steps} steps at {config.training.image_size}px")
    if not config.parallel_training or len(todo) < 2:
        built = [_train_and_export(config, m, path, i) for i, (m, path) in enumerate(todo)]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(todo), mp_context=context) as pool:
            futures = [pool.submit(_train_and_export, config, m, path, i) for i, (m, path) in enumerate(todo)]
            built = [f.result() for f in futures]
    log(f"exported {', '.join(str(p) for p in built)}")
    return paths


def _write_ensemble(out: Path, member_paths: Sequence[Path], check_inputs: np.ndarray) -> FileEntry:
    """Fuses the members into OUT/ensemble.onnx and fails unless it equals their mean on `check_inputs`."""
    names = [p.stem for p in member_paths]
    fused = fuse([onnx.load(p) for p in member_paths], names)
    onnx.helper.set_model_props(fused, {"members": json.dumps(names)})
    path = out / ENSEMBLE_FILE
    onnx.save(fused, path)
    worst = check_fused_matches_members(path, member_paths, check_inputs)
    log(f"fused {len(member_paths)} members into {path}; largest difference from their mean {worst:.1e}")
    return FileEntry.of(out, path)


def _random_inputs(spec: InputSpec, seed: int = 0) -> np.ndarray:
    return (
        np.random.default_rng(seed).normal(0, 1, (RANDOM_CHECK_INPUTS, 3, spec.height, spec.width)).astype(np.float32)
    )


def _write_int8(
    config: Int8Config, out: Path, spec: InputSpec, fp32_metrics: Metrics, test: Batch, test_inputs: np.ndarray
) -> tuple[FileEntry, Metrics] | None:
    """Quantises OUT/ensemble.onnx to OUT/ensemble.int8.onnx and keeps it if it loses at most
    config.max_accuracy_loss of mean label accuracy on the held-out set."""
    path = out / INT8_FILE
    path.unlink(missing_ok=True)
    if not config.enabled:
        return None
    log(f"quantising the fused graph to int8, calibrated on {config.calibration_images} training images")
    quantize_static_int8(out / ENSEMBLE_FILE, path, spec, config.calibration_images)
    metrics = score_model(path, test, test_inputs)
    loss = accuracy_loss(fp32_metrics, metrics)
    verdict = (
        f"mean label accuracy {-loss * 100:+.2f} points against fp32 "
        f"(may lose {config.max_accuracy_loss * 100:g} at most)"
    )
    if loss > config.max_accuracy_loss:
        log(f"int8 ensemble not kept: {verdict}")
        path.unlink()
        return None
    log(f"int8 ensemble: {_describe(metrics)}; {verdict}")
    return FileEntry.of(out, path), metrics


def build(config: BuildConfig, out: Path) -> Manifest:
    """Builds everything `config` asks for into `out`, reusing what an earlier build of it left there."""
    config_json = config.model_dump(mode="json")
    try:
        existing = load_manifest(out)
        if existing.build_config == config_json:
            log(f"{out} is up to date")
            return existing
    except ManifestError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    member_paths = _build_members(config, out / "members")
    spec = config.input_spec
    log(f"scoring on {config.test_images} held-out images")
    test = held_out_set(config.training.image_size, config.test_images)
    test_inputs = spec.normalise(test.images)
    ensemble = _write_ensemble(out, member_paths, np.concatenate([_random_inputs(spec), test_inputs[:32]]))
    members = []
    for member, path in zip(config.members, member_paths, strict=True):
        metrics = score_model(path, test, test_inputs)
        members.append(
            Member(
                name=member.name,
                file=FileEntry.of(out, path),
                width_scale=member.width_scale,
                seed=member.seed,
                parameters=int(_member_metadata(path)["parameters"]),
                metrics=metrics,
            )
        )
        log(f"{member.name}: {members[-1].parameters:,} parameters, {_describe(metrics)}")
    ensemble_metrics = score_model(out / ensemble.path, test, test_inputs)
    log(f"ensemble: {_describe(ensemble_metrics)}")
    int8 = _write_int8(config.int8, out, spec, ensemble_metrics, test, test_inputs)
    manifest = Manifest(
        name=config.name,
        labels=LABELS,
        input=spec,
        members=tuple(members),
        ensemble=ensemble,
        ensemble_metrics=ensemble_metrics,
        ensemble_int8=int8[0] if int8 else None,
        ensemble_int8_metrics=int8[1] if int8 else None,
        opset=config.opset,
        versions=versions(),
        build_config=config_json,
    )
    log(f"wrote {manifest.write(out)}")
    return manifest


def _describe(metrics: Metrics) -> str:
    return (
        f"mean label accuracy {metrics.mean_label_accuracy:.3f}, exact match {metrics.exact_match_accuracy:.3f}, "
        f"mean IoU {metrics.mean_iou:.3f}"
    )


def fuse_files(member_files: Sequence[Path], out: Path, name: str, labels: Sequence[str] | None = None) -> Manifest:
    """Fuses ONNX members a user brings. Labels and the input spec come from the members' metadata when
    they were built here; otherwise `labels` is required and the input spec takes the manifest's defaults."""
    if len(member_files) < 2:
        raise FusionError("an ensemble needs at least two members")
    models = []
    for path in member_files:
        try:
            models.append(onnx.load(path))
        except Exception as exc:  # onnx raises protobuf's DecodeError and others for a corrupt file
            raise FusionError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    signatures = [signature(m, str(p)) for m, p in zip(models, member_files, strict=True)]
    metadata = {p.key: p.value for p in models[0].metadata_props}
    labels = tuple(labels or json.loads(metadata.get("labels", "[]")))
    if len(labels) != signatures[0].labels:
        raise FusionError(
            f"the members predict {signatures[0].labels} labels; give as many with --labels, got {len(labels)}"
        )
    spec = (
        InputSpec.model_validate_json(metadata["input"])
        if "input" in metadata
        else InputSpec(height=signatures[0].height, width=signatures[0].width)
    )
    members_dir = out / "members"
    members_dir.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in member_files]
    if len(set(stems)) != len(stems):
        raise FusionError(f"member file names must differ, got {stems}")
    copies = [members_dir / p.name for p in member_files]
    for source, copy in zip(member_files, copies, strict=True):
        if source.resolve() != copy.resolve():
            shutil.copyfile(source, copy)
    ensemble = _write_ensemble(out, copies, _random_inputs(spec))
    (out / INT8_FILE).unlink(missing_ok=True)  # no held-out set to check an int8 graph on: none is shipped
    manifest = Manifest(
        name=name,
        labels=labels,
        input=spec,
        members=tuple(Member(name=c.stem, file=FileEntry.of(out, c)) for c in copies),
        ensemble=ensemble,
        opset=max(o.version for m in models for o in m.opset_import if o.domain in ("", "ai.onnx")),
        versions=versions(),
        build_config={"fused_from": [str(p) for p in member_files]},
    )
    log(f"wrote {manifest.write(out)}")
    return manifest
