"""The manifest: the one contract between the build step (which writes it) and the service (which reads it).

Everything the service needs to know about the models (labels, preprocessing, tensor names, files and
their checksums) is written here once by `model_build` and read here once by the service.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_NAME = "manifest.json"

# Tensor names every member and the fused graph share; the fused graph adds the per-member stack.
INPUT_NAME = "image"
CLASS_PROBS = "class_probs"
MASK_PROBS = "mask_probs"
MEMBER_CLASS_PROBS = "member_class_probs"


class ManifestError(Exception):
    """The manifest or one of the files it names is missing, invalid or corrupt."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How a picture becomes the model's input tensor: resize, then (pixel * scale - mean) / std."""

    name: str = INPUT_NAME
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    channel_order: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: Literal["stretch"] = "stretch"

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB pixels [N, height, width, 3] to the model's float32 input [N, 3, height, width]."""
        x = pixels.astype(np.float32) * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class FileEntry(_Strict):
    """A file of the model directory, relative to it, with its checksum."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(gt=0)

    @classmethod
    def of(cls, root: Path, path: Path) -> FileEntry:
        relative = path.relative_to(root).as_posix()
        return cls(path=relative, sha256=sha256_of(path), size_bytes=path.stat().st_size)

    def verify(self, root: Path) -> Path:
        """Returns the file's absolute path, or raises ManifestError if it is missing or altered."""
        path = root / self.path
        if not path.is_file():
            raise ManifestError(f"model file {path} is missing")
        if path.stat().st_size != self.size_bytes:
            raise ManifestError(
                f"model file {path} has {path.stat().st_size} bytes, the manifest says {self.size_bytes}"
            )
        if sha256_of(path) != self.sha256:
            raise ManifestError(f"model file {path} does not match its sha256 in the manifest")
        return path


class Metrics(_Strict):
    """Held-out metrics: per-label accuracy averaged, all labels right, mean IoU of the masks."""

    mean_label_accuracy: float = Field(ge=0, le=1)
    exact_match_accuracy: float = Field(ge=0, le=1)
    mean_iou: float = Field(ge=0, le=1)
    images: int = Field(gt=0)


class Member(_Strict):
    name: str
    file: FileEntry
    width_scale: int | None = None
    parameters: int | None = None
    seed: int | None = None
    metrics: Metrics | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    labels: tuple[str, ...] = Field(min_length=1)
    input: InputSpec
    members: tuple[Member, ...] = Field(min_length=1)
    ensemble: FileEntry
    ensemble_metrics: Metrics | None = None
    # The fused graph quantised to int8, when the build made it and it kept the accuracy: the fused-int8 mode.
    ensemble_int8: FileEntry | None = None
    ensemble_int8_metrics: Metrics | None = None
    opset: int
    versions: dict[str, str]
    build_config: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_names(self) -> Manifest:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {list(self.labels)}")
        return self

    @property
    def mask_classes(self) -> tuple[str, ...]:
        """Mask class 0 is the background, class i is labels[i - 1]."""
        return ("background", *self.labels)

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


def load_manifest(model_dir: Path, *, verify_files: bool = True) -> Manifest:
    """Reads and validates the manifest; with verify_files, checks each file's size and sha256."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST_NAME} in {model_dir}: build the models first (make models)")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValueError as exc:
        first = str(exc).splitlines()
        raise ManifestError(f"{path} is not a valid manifest: {' '.join(first[:3])}") from None
    if verify_files:
        for entry in (*(m.file for m in manifest.members), manifest.ensemble, manifest.ensemble_int8):
            if entry is not None:
                entry.verify(Path(model_dir))
    return manifest
