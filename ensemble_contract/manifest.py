"""manifest.json: the model directory's schema and layout, checked by sha256, and how images become tensors.

DIR/manifest.json           this schema
DIR/members/<member>.onnx   one file per member, as the user or the build made it
DIR/ensemble.onnx           the fused graph (inputs and combined outputs named as the members')
DIR/ensemble.int8.onnx      the fused graph quantised to int8, when it was made and kept
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ensemble_contract.combine import Combination
from ensemble_contract.signature import Signature, StrictModel, generated_inputs

MANIFEST_NAME = "manifest.json"
MEMBERS_DIR = "members"
ENSEMBLE_FILE = "ensemble.onnx"
INT8_FILE = "ensemble.int8.onnx"
SCHEMA_VERSION = 2


class ManifestError(Exception):
    """The manifest or one of the files it names is missing, invalid or corrupt."""


class ImageTask(StrEnum):
    CLASSIFY = "classify"  # one label per image: softmax over the scores, the top label is present
    MULTILABEL = "multilabel"  # independent labels: sigmoid per score, present above the threshold
    SEGMENT = "segment"  # a class per pixel only: the mask output's argmax over its class axis (1)


class ImageSpec(StrictModel):
    """How a picture becomes the image input, and what the outputs mean, for POST /predict.

    Pixels are resized to width x height (stretched, bilinear), put in channel_order, scaled:
    (pixel * scale - mean) / std per channel, and laid out as layout with a batch axis first."""

    input: str
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: Literal["stretch"] = "stretch"
    task: ImageTask
    labels: tuple[str, ...] = Field(default=(), description="Names of the scores output's classes.")
    scores_output: str | None = Field(None, description="Per-label scores [N, labels] (classify, multilabel).")
    scores: Literal["probabilities", "logits"] = "probabilities"
    mask_output: str | None = Field(None, description="Per-pixel class scores [N, classes, H, W].")
    mask_classes: tuple[str, ...] = Field(default=(), description="Mask class names by index; 0 first.")

    @model_validator(mode="after")
    def _outputs_for_task(self) -> ImageSpec:
        if self.task is not ImageTask.SEGMENT and (self.scores_output is None or not self.labels):
            raise ValueError(f"a {self.task} image model needs scores_output and labels")
        if self.task is ImageTask.SEGMENT and self.mask_output is None:
            raise ValueError("a segment image model needs mask_output")
        if self.mask_output is not None and not self.mask_classes:
            raise ValueError("mask_output needs mask_classes")
        if len(set(self.labels)) != len(self.labels) or len(set(self.mask_classes)) != len(self.mask_classes):
            raise ValueError("label and mask class names must be unique")
        return self

    @property
    def shape(self) -> tuple[int, int, int]:
        """The input's shape after the batch axis."""
        return (3, self.height, self.width) if self.layout == "NCHW" else (self.height, self.width, 3)

    def normalise(self, pixels: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """uint8 RGB pixels [N, height, width, 3] to the input tensor; the one preprocessing function of
        training, calibration, the build's scoring and the service."""
        if self.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        x = pixels.astype(np.float32) * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x.astype(dtype))

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Scores [..., labels] as probabilities: as they are (clipped to [0, 1] against rounding), or softmax
        (classify) / sigmoid (multilabel) of logits."""
        scores = scores.astype(np.float64)
        if self.scores == "probabilities":
            return np.clip(scores, 0, 1)
        if self.task is ImageTask.CLASSIFY:
            exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
            return exp / exp.sum(axis=-1, keepdims=True)
        return 1 / (1 + np.exp(-scores))


class FileEntry(StrictModel):
    """A file of the model directory, relative to it, with its checksum."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)

    @classmethod
    def of(cls, root: Path, path: Path) -> FileEntry:
        relative = path.relative_to(root).as_posix()
        return cls(path=relative, sha256=sha256_of(path), size_bytes=path.stat().st_size)

    def verify(self, root: Path, digest: Callable[[Path], str] | None = None) -> Path:
        """Returns the file's absolute path, or raises ManifestError if it is missing or altered."""
        path = root / self.path
        if not path.is_file():
            raise ManifestError(f"model file {path} is missing")
        if path.stat().st_size != self.size_bytes:
            raise ManifestError(
                f"model file {path} has {path.stat().st_size} bytes, the manifest says {self.size_bytes}"
            )
        if (digest or sha256_of)(path) != self.sha256:
            raise ManifestError(f"model file {path} does not match its sha256 in the manifest")
        return path


class Metrics(StrictModel):
    """Held-out metrics of our UNets: per-label accuracy averaged, all labels right, mean IoU (of models trained on
    masks)."""

    mean_label_accuracy: float = Field(ge=0, le=1)
    exact_match_accuracy: float = Field(ge=0, le=1)
    mean_iou: float | None = Field(None, ge=0, le=1)
    images: int = Field(gt=0)


class Member(StrictModel):
    name: str
    file: FileEntry
    width_scale: int | None = None
    parameters: int | None = None
    seed: int | None = None
    metrics: Metrics | None = None


class Int8(StrictModel):
    """The int8 graph and how it was judged, or why there is none."""

    file: FileEntry | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="fp32 and int8 scores it was judged on.")
    note: str = Field(description="Why it was kept, or why there is none.")


class Manifest(StrictModel):
    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    signature: Signature = Field(description="The fused graph's inputs and outputs; members take the same inputs.")
    combine: tuple[Combination, ...] = Field(min_length=1)
    weights: tuple[float, ...] | None = Field(None, description="Members' weights in mean and vote; None: equal.")
    image: ImageSpec | None = Field(None, description="How /predict turns an image into the input; None: /v2 only.")
    members: tuple[Member, ...] = Field(min_length=1)
    ensemble: FileEntry
    ensemble_metrics: Metrics | None = None
    int8: Int8
    tolerance: float | None = Field(
        None,
        gt=0,
        description="How far another engine's float outputs may be from ONNX Runtime's, relative, for the service to "
        "run it (ensemble_contract.tolerance); None: the datatype's, as the build checks the fused graph.",
    )
    opset: int
    versions: dict[str, str]
    build_config: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(f"{len(self.weights)} weights for {len(self.members)} members")
        outputs = set(self.signature.output_names)
        for combination in self.combine:
            missing = {combination.output, combination.members_output} - outputs - {None}
            if missing:
                raise ValueError(f"combined output(s) {sorted(missing)} are not in the signature")
        if self.image is not None:
            image_input = self.signature.input(self.image.input)
            if image_input is None or len(self.signature.inputs) != 1:
                raise ValueError(f"image input {self.image.input!r} must be the graph's only input")
            for name in (self.image.scores_output, self.image.mask_output):
                if name is not None and name not in outputs:
                    raise ValueError(f"image output {name!r} is not in the signature")
        return self

    @property
    def member_outputs(self) -> tuple[str, ...]:
        """What each member's session is asked for in the separate modes."""
        return tuple(c.output for c in self.combine)

    def example_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs that fit the signature (an image input at the size /predict sends): warm-up, benchmarks."""
        sizes = {self.image.input: (batch, *self.image.shape)} if self.image is not None else None
        return generated_inputs(self.signature.inputs, batch, sizes=sizes, seed=seed)

    def write(self, model_dir: Path) -> Path:
        path = model_dir / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(
    model_dir: Path, *, verify_files: bool = True, digest: Callable[[Path], str] | None = None
) -> Manifest:
    """Reads and validates the manifest; with verify_files, checks each file's size and sha256 (computed by
    `digest`, by default sha256_of)."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_NAME} in {model_dir}: build the models first (make models), or point MODEL_DIR at a "
            "directory made by `python -m model_build build` or `fuse`"
        )
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        first = str(exc).splitlines()
        raise ManifestError(f"{path} is not a valid manifest: {' '.join(first[:3])}") from None
    if verify_files:
        for entry in (*(m.file for m in manifest.members), manifest.ensemble, manifest.int8.file):
            if entry is not None:
                entry.verify(Path(model_dir), digest)
    return manifest
