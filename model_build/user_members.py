"""`fuse`: an ensemble of ONNX members a user brings, fused, checked, optionally quantised, written as a model
directory the service serves in every mode (layout: ensemble_contract.manifest)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from pydantic import ValidationError

from ensemble_contract.combine import Rule, normalised_weights
from ensemble_contract.manifest import MANIFEST_NAME, MEMBERS_DIR, FileEntry, ImageSpec, ImageTask, Manifest, Member
from ensemble_contract.signature import DYNAMIC, Signature, generated_inputs
from model_build.config import MAX_ACCURACY_LOSS
from model_build.directory import log, versions, write_ensemble, write_int8
from model_build.fuse import FusionError, Plan, load_member, member_signature, plan
from model_build.verify import cpu_session, run_in_batches

CHECK_ROWS = 8


@dataclass(frozen=True)
class FuseRequest:
    """Everything `python -m model_build fuse` takes."""

    members: Sequence[Path]
    out: Path
    name: str = "custom-ensemble"
    rules: Mapping[str, Rule] = field(default_factory=dict)
    weights: Sequence[float] | None = None
    image: Mapping[str, object] | None = None  # ImageSpec fields, for /predict; input, height, width may be omitted
    calibration: Path | None = None
    evaluation: Path | None = None
    max_accuracy_loss: float = MAX_ACCURACY_LOSS


def _npz(path: Path, names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # numpy raises several kinds for a file that is not an npz
        raise FusionError(f"{what} {path}: not a readable .npz file ({type(exc).__name__})") from None
    missing = sorted(set(names) - set(arrays))
    if missing:
        raise FusionError(f"{what} {path}: no array for input(s) {missing}; it has {sorted(arrays)}")
    if len({len(arrays[n]) for n in names}) != 1:
        raise FusionError(f"{what} {path}: the inputs' arrays must have the same number of rows")
    return arrays


def _typed(arrays: Mapping[str, np.ndarray], signature: Signature) -> dict[str, np.ndarray]:
    """The input arrays in the signature's element types, checked against its shapes."""
    feeds = {}
    for spec in signature.inputs:
        array = np.ascontiguousarray(arrays[spec.name].astype(spec.dtype))
        if not spec.fits(array.shape):
            raise FusionError(f"input {spec.name!r} of shape {list(array.shape)} does not fit {spec.describe()}")
        feeds[spec.name] = array
    return feeds


def _agreement(expected: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Accuracy against the expected outputs: labels equal (integer outputs), top-1 equal (float scores [N, C])."""
    scores = {}
    for name, truth in expected.items():
        got = outputs[name]
        if got.dtype.kind in "iu":
            scores[f"{name}_accuracy"] = float((got == truth).mean())
        else:
            scores[f"{name}_top1_accuracy"] = float((got.argmax(axis=-1) == truth.argmax(axis=-1)).mean())
    return scores


def _image_spec(options: Mapping[str, object], fusion: Plan) -> ImageSpec:
    """The /predict spec from the CLI's options; input, height and width default to the signature's, the scores
    (or mask) output to the only output combined by mean, mask classes to the labels."""
    options, signature = dict(options), fusion.signature
    means = [c.output for c in fusion.combine if c.rule is Rule.MEAN]
    role = "mask_output" if options["task"] == ImageTask.SEGMENT else "scores_output"
    if role not in options and len(means) == 1:
        options[role] = means[0]
    if options.get("mask_output") and not options.get("mask_classes"):
        options["mask_classes"] = options.get("labels", ())
    images = [t for t in signature.inputs if t.shape is not None and len(t.shape) == 4]
    if "input" not in options:
        if len(signature.inputs) != 1 or not images:
            raise FusionError("--task needs a single 4-D image input; name it with --image-input")
        options["input"] = images[0].name
    tensor = signature.input(str(options["input"]))
    if tensor is None or tensor.shape is None or len(tensor.shape) != 4:
        raise FusionError(f"--image-input {options['input']!r} is not a 4-D input of the members")
    layout = str(options.get("layout", "NCHW"))
    height_axis, width_axis, channel_axis = (2, 3, 1) if layout == "NCHW" else (1, 2, 3)
    if tensor.shape[channel_axis] not in (3, DYNAMIC):
        raise FusionError(f"input {tensor.name!r} {list(tensor.shape)} has no 3-channel axis in {layout} layout")
    for key, axis in (("height", height_axis), ("width", width_axis)):
        if key not in options:
            if tensor.shape[axis] == DYNAMIC:
                raise FusionError(f"input {tensor.name!r} has a dynamic {key}: give --image-size HEIGHTxWIDTH")
            options[key] = tensor.shape[axis]
    try:
        return ImageSpec.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        raise FusionError(f"image options: {problems}") from None


def _check_batch(signature: Signature) -> int:
    """Rows per check run: the inputs' static batch size when they have one (many exports fix it at 1)."""
    first = {t.shape[0] for t in signature.inputs if t.shape}
    return first.pop() if len(first) == 1 and DYNAMIC not in first else CHECK_ROWS


def _image_outputs_fit(image: ImageSpec, signature: Signature) -> None:
    """FusionError unless the label names match the scores output and the mask classes the mask output."""
    for name, axis, names, option in (
        (image.scores_output, -1, image.labels, "--labels"),
        (image.mask_output, 1, image.mask_classes, "--mask-classes"),
    ):
        spec = signature.output(name) if name else None
        if spec is not None and spec.shape and len(spec.shape) > abs(axis):
            classes = spec.shape[axis]
            if classes != DYNAMIC and classes != len(names):
                raise FusionError(f"output {name!r} gives {classes} classes; {option} names {len(names)}")


def _probabilities_or_logits(path: Path, image: ImageSpec, feeds: Mapping[str, np.ndarray], batch: int) -> None:
    """FusionError when scores said to be probabilities fall outside [0, 1] (they are logits, most likely)."""
    if image.scores_output is None or image.scores == "logits":
        return
    scores = run_in_batches(cpu_session(path), feeds, [image.scores_output], batch)[image.scores_output]
    if not np.isfinite(scores).all() or scores.min() < -1e-6 or scores.max() > 1 + 1e-6:
        raise FusionError(
            f"output {image.scores_output!r} has values outside [0, 1] ({scores.min():.3g} to {scores.max():.3g}): "
            "if they are logits, give --scores logits"
        )


def fuse_files(request: FuseRequest) -> Manifest:
    """Fuses, checks and writes the user's members. Everything that can be checked before any work is, with a
    FusionError naming the member, tensor and fix; the directory is written beside OUT and moved into place only
    when complete, so a failure leaves OUT as it was."""
    paths = list(request.members)
    if len(paths) < 2:
        raise FusionError("an ensemble needs at least two members")
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise FusionError(f"member file names must differ, got {stems}")
    if request.weights is not None:
        try:
            normalised_weights(request.weights, len(paths))
        except ValueError as exc:
            raise FusionError(f"--weights: {exc}") from None
    models, external = zip(*(load_member(p) for p in paths), strict=True)
    fusion = plan({str(p): member_signature(m, str(p)) for m, p in zip(models, paths, strict=True)}, request.rules)
    log(f"inputs: {', '.join(t.describe() for t in fusion.signature.inputs)}")
    for c in fusion.combine:
        stacked = f", each member's in {c.members_output}" if c.members_output else ""
        log(f"output {c.output}: {c.rule} of the members{stacked}")
    for output, reason in fusion.left_out.items():
        log(f"output {output!r} is not in the fused graph: {reason}")
    metadata = {p.key: p.value for p in models[0].metadata_props}
    image = None
    if request.image is not None:
        image = _image_spec(request.image, fusion)
    elif "image" in metadata:  # members our build made describe themselves
        image = ImageSpec.model_validate_json(metadata["image"])
    if image is not None:
        _image_outputs_fit(image, fusion.signature)
    input_names = [t.name for t in fusion.signature.inputs]
    calibration = (
        _typed(_npz(request.calibration, input_names, "--calibration"), fusion.signature)
        if request.calibration
        else None
    )
    evaluation = _npz(request.evaluation, input_names, "--eval") if request.evaluation else None
    if evaluation is not None:
        expected = {k: v for k, v in evaluation.items() if k not in input_names}
        unknown = sorted(set(expected) - set(fusion.signature.output_names))
        if not expected or unknown:
            raise FusionError(
                f"--eval {request.evaluation}: give expected outputs named as the ensemble's "
                f"{list(fusion.signature.output_names)}; got {sorted(expected)}"
            )
    if request.evaluation and not request.calibration:
        raise FusionError("--eval judges the int8 graph: give --calibration too")

    request.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{request.out.name}.", dir=request.out.parent))
    try:
        manifest = _write(request, staging, paths, models, external, fusion, image, calibration, evaluation)
        _replace(request.out, staging)
    except FusionError:
        raise
    except Exception as exc:  # ONNX Runtime or onnx refusing what the checks above let through
        raise FusionError(
            f"fusing failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {request.out / MANIFEST_NAME}")
    return manifest


def _replace(out: Path, staging: Path) -> None:
    """Moves the complete staging directory to OUT, replacing an earlier one."""
    previous = out.with_name(f".{out.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)
    staging.rename(out)
    shutil.rmtree(previous, ignore_errors=True)


def _write(
    request: FuseRequest,
    out: Path,
    paths: Sequence[Path],
    models: Sequence[onnx.ModelProto],
    external: Sequence[bool],
    fusion: Plan,
    image: ImageSpec | None,
    calibration: Mapping[str, np.ndarray] | None,
    evaluation: Mapping[str, np.ndarray] | None,
) -> Manifest:
    members_dir = out / MEMBERS_DIR
    members_dir.mkdir()
    copies = [members_dir / f"{p.stem}.onnx" for p in paths]
    for source, model, had_external_data, copy in zip(paths, models, external, copies, strict=True):
        if had_external_data:
            onnx.save(model, copy)  # its external data, loaded, written inside the copy
        else:
            shutil.copyfile(source, copy)
    batch = _check_batch(fusion.signature)
    if calibration is not None:  # real inputs, when the user gave some
        check = {name: array[:batch] for name, array in calibration.items()}
    else:
        sizes = {image.input: (batch, *image.shape)} if image is not None else None
        check = generated_inputs(fusion.signature.inputs, batch, sizes=sizes)
    ensemble = write_ensemble(out, models, copies, fusion, request.weights, check, batch)
    if image is not None:
        _probabilities_or_logits(out / ensemble.path, image, check, batch)

    scorer = None
    if evaluation is not None:
        input_names = {t.name for t in fusion.signature.inputs}
        feeds = _typed(evaluation, fusion.signature)
        expected = {k: v for k, v in evaluation.items() if k not in input_names}

        def scorer(path: Path) -> dict[str, float]:
            return _agreement(expected, run_in_batches(cpu_session(path), feeds, list(expected), batch))

    int8 = write_int8(out, calibration, scorer, request.max_accuracy_loss, batch)
    manifest = Manifest(
        name=request.name,
        signature=fusion.signature,
        combine=fusion.combine,
        weights=tuple(request.weights) if request.weights else None,
        image=image,
        members=tuple(Member(name=c.stem, file=FileEntry.of(out, c)) for c in copies),
        ensemble=ensemble,
        int8=int8,
        opset=max(o.version for m in models for o in m.opset_import if o.domain in ("", "ai.onnx")),
        versions=versions(),
        build_config={
            "fused_from": [str(p) for p in paths],
            "left_out": fusion.left_out,
            "calibration": str(request.calibration) if request.calibration else None,
            "eval": str(request.evaluation) if request.evaluation else None,
        },
    )
    manifest.write(out)
    return manifest


def labels_option(value: str) -> tuple[str, ...]:
    """--labels: comma-separated names, or @FILE with one name a line."""
    if value.startswith("@"):
        return tuple(line.strip() for line in Path(value[1:]).read_text().splitlines() if line.strip())
    return tuple(name.strip() for name in value.split(","))
