"""The build pipeline of our UNets: train members (on the synthetic shapes or a user's folder), export them, fuse
them, check the fusion, score everything, write the manifest (layout: ensemble_contract.manifest). `fuse`
(model_build.user_members) does the second half for members a user brings.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from ensemble_contract.manifest import (
    MEMBERS_DIR,
    FileEntry,
    Int8,
    Manifest,
    ManifestError,
    Member,
    Metrics,
    load_manifest,
)
from ensemble_contract.signature import generated_inputs
from model_build.config import CLASS_PROBS, IMAGE_INPUT, BuildConfig, Int8Config, MemberConfig
from model_build.curve import write_curve
from model_build.data import Batch, TrainingData
from model_build.directory import log, versions, write_ensemble, write_int8
from model_build.evaluate import score_model
from model_build.export import export_member
from model_build.folder import DatasetError, read_folder
from model_build.fuse import member_signature, plan
from model_build.shapes import ShapesData
from model_build.timing import Stopwatch, timed
from model_build.train import Checkpoint, train_member
from model_build.unet import UNet, parameter_count

TRAINING_DIR = "training"  # each member's training curve (CSV and PNG), beside the models

RANDOM_CHECK_INPUTS = 8


def _member_metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def is_built(path: Path, config: BuildConfig, member: MemberConfig) -> bool:
    """Whether `path` holds `member` as `config` builds it (the fingerprint its export recorded matches)."""
    return path.is_file() and _member_metadata(path).get("fingerprint") == config.member_fingerprint(member)


def training_data(config: BuildConfig) -> TrainingData:
    """What `config` trains on: the shapes, or the folder it names, as it was when the build was configured."""
    if config.data is None:
        return ShapesData()
    folder = read_folder(Path(config.data.path))
    if folder.sha256 != config.data.sha256:
        raise DatasetError(folder.root, ["its files changed since this build was configured: build again"])
    return folder


def _train_and_export(
    config: BuildConfig, member: MemberConfig, path: Path, progress_position: int, data: TrainingData, resume: bool
) -> str:
    """One member from seed (or, with `resume`, its checkpoint) to ONNX file; runs in a worker process when members
    train at once. Returns where its time went, for the build log."""
    spec = config.image_spec
    training_dir = path.parent.parent / TRAINING_DIR
    training_dir.mkdir(parents=True, exist_ok=True)  # the checkpoints' and the curves'
    checkpoint = Checkpoint(training_dir / f"{member.name}.checkpoint.pt", config.member_fingerprint(member))
    trained = train_member(member, config.training, spec, data, progress_position, checkpoint, resume)
    write_curve(training_dir, member.name, trained)
    exporting = Stopwatch.start()
    unet = UNet(member.width_scale, len(spec.labels))
    unet.load_state_dict(trained.weights)
    metadata = {
        "name": member.name,
        "width_scale": str(member.width_scale),
        "seed": str(member.seed),
        "parameters": str(parameter_count(unet)),
        "fingerprint": config.member_fingerprint(member),
        "image": spec.model_dump_json(),
    }
    export_member(unet, path, config.training.size, config.opset, metadata, spec.mask_output is not None)
    checkpoint.path.unlink(missing_ok=True)  # the member is built: nothing left to resume
    return f"{member.name}: {trained.describe()}, exported in {exporting.describe()}"


def _build_members(config: BuildConfig, members_dir: Path, data: TrainingData, resume: bool) -> list[Path]:
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
    with timed("training and export"):
        if not config.parallel_training or len(todo) < 2:
            reports = [_train_and_export(config, m, path, i, data, resume) for i, (m, path) in enumerate(todo)]
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=len(todo), mp_context=context) as pool:
                futures = [
                    pool.submit(_train_and_export, config, m, path, i, data, resume) for i, (m, path) in enumerate(todo)
                ]
                reports = [f.result() for f in futures]
        for report in reports:
            log(report)
        log(f"exported {', '.join(str(path) for _, path in todo)}")
    return paths


def _write_int8(config: BuildConfig, out: Path, test: Batch, test_inputs: np.ndarray, data: TrainingData) -> Int8:
    """The int8 graph, calibrated on training images, kept when it loses at most max_accuracy_loss of mean label
    accuracy on the held-out set."""
    int8: Int8Config = config.int8
    if not int8.enabled:
        return write_int8(out, None, None, int8.max_accuracy_loss).model_copy(update={"note": "int8 turned off"})
    spec = config.image_spec
    calibration_images = data.calibration_set(config.training.size, int8.calibration_images).images
    calibration = {IMAGE_INPUT: spec.normalise(calibration_images)}

    def mean_label_accuracy(path: Path) -> dict[str, float]:
        return {"mean_label_accuracy": score_model(path, test, test_inputs).mean_label_accuracy}

    return write_int8(out, calibration, mean_label_accuracy, int8.max_accuracy_loss)


def build(config: BuildConfig, out: Path, data: TrainingData | None = None, resume: bool = False) -> Manifest:
    """Builds everything `config` asks for into `out`, reusing what an earlier build of it left there (with
    `resume`, the members' checkpoints too). `data`: what `config` trains on, when the caller has already read it."""
    config_json = config.model_dump(mode="json")
    try:
        existing = load_manifest(out)
        if existing.build_config == config_json:
            log(f"{out} is up to date")
            return existing
    except ManifestError:
        pass
    total = Stopwatch.start()
    data = data or training_data(config)  # a folder is checked whole before anything is written
    out.mkdir(parents=True, exist_ok=True)
    member_paths = _build_members(config, out / MEMBERS_DIR, data, resume)
    spec = config.image_spec
    with timed(f"reading {config.test_images} held-out images at most"):
        test = data.test_set(config.training.size, config.test_images)
        test_inputs = spec.normalise(test.images)
    with timed("fusion and its numeric check"):
        models = [onnx.load(p) for p in member_paths]
        fusion = plan(
            {p.stem: member_signature(m, p.stem) for m, p in zip(models, member_paths, strict=True)},
            stack_members=[CLASS_PROBS],
        )
        random_inputs = generated_inputs(
            fusion.signature.inputs, RANDOM_CHECK_INPUTS, sizes={IMAGE_INPUT: (RANDOM_CHECK_INPUTS, *spec.shape)}
        )
        check = {IMAGE_INPUT: np.concatenate([random_inputs[IMAGE_INPUT], test_inputs[:32]])}
        ensemble = write_ensemble(out, models, member_paths, fusion, None, check)
    with timed("scoring the members and the ensemble"):
        log(f"scoring on {len(test.presence)} held-out images")
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
    with timed("int8 (calibration, quantisation, scoring)"):
        int8 = _write_int8(config, out, test, test_inputs, data)
    manifest = Manifest(
        name=config.name,
        signature=fusion.signature,
        combine=fusion.combine,
        image=spec,
        members=tuple(members),
        ensemble=ensemble,
        ensemble_metrics=ensemble_metrics,
        int8=int8,
        opset=config.opset,
        versions=versions(),
        build_config=config_json,
    )
    log(f"wrote {manifest.write(out)}")
    total.report("build")
    return manifest


def _describe(metrics: Metrics) -> str:
    iou = "" if metrics.mean_iou is None else f", mean IoU {metrics.mean_iou:.3f}"
    return f"mean label accuracy {metrics.mean_label_accuracy:.3f}, exact match {metrics.exact_match_accuracy:.3f}{iou}"
