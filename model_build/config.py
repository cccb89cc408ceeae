"""Build configurations: what to train, how long, at which resolution. Presets are named instances."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from ensemble_contract.manifest import ImageSpec, ImageTask
from model_build.shapes import LABELS

if TYPE_CHECKING:
    from model_build.folder import LabelledFolder

# Our UNet members' tensors (a user's members keep their own names).
IMAGE_INPUT = "image"
CLASS_PROBS = "class_probs"  # [N, labels], sigmoid per label
MASK_PROBS = "mask_probs"  # [N, 1 + labels, H, W], softmax per pixel; class 0 is the background

MAX_ACCURACY_LOSS = 0.01  # one point of mean label accuracy: more, and the build does not ship the int8 graph


def image_spec(size: tuple[int, int], labels: tuple[str, ...] = LABELS, masks: bool = True) -> ImageSpec:
    """How our members see a picture (height, width), and what their outputs mean: a mask output only for members
    trained on masks."""
    return ImageSpec(
        input=IMAGE_INPUT,
        height=size[0],
        width=size[1],
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        task=ImageTask.MULTILABEL,
        labels=labels,
        scores_output=CLASS_PROBS,
        mask_output=MASK_PROBS if masks else None,
        mask_classes=("background", *labels) if masks else (),
    )


class TrainingConfig(BaseModel):
    """How one member is trained; with its seed and width it fully determines the member's weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(64, ge=16, le=512, multiple_of=16)  # the height, and the width unless image_width
    image_width: int | None = Field(None, ge=16, le=512, multiple_of=16)
    batch_size: int = Field(16, ge=1, le=256)
    steps: int = Field(1500, ge=4)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    classification_loss_weight: float = Field(2.0, ge=0)
    threads: int = Field(1, ge=1, le=64)
    validations: int = Field(10, ge=1)  # times the validation set is scored (if the data has one): the best is kept

    @property
    def size(self) -> tuple[int, int]:
        return self.image_size, self.image_width or self.image_size


class MemberConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width_scale: int = Field(ge=1, le=16)
    seed: int = Field(ge=0, lt=1_000_000)

    @property
    def name(self) -> str:
        return f"unet-w{self.width_scale}-s{self.seed}"


class Int8Config(BaseModel):
    """Whether the build also ships the fused graph quantised to int8 (static QDQ), and when it keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    calibration_images: int = Field(200, ge=1, le=10_000)
    max_accuracy_loss: float = Field(MAX_ACCURACY_LOSS, ge=0, le=1)


class FolderData(BaseModel):
    """A user's folder of labelled images (model_build.folder), as the build recorded it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    labels: tuple[str, ...]
    masks: bool

    @classmethod
    def of(cls, folder: LabelledFolder) -> FolderData:
        return cls(path=str(folder.root), sha256=folder.sha256, labels=folder.labels, masks=folder.has_masks)


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "shapes-ensemble"
    members: tuple[MemberConfig, ...] = Field(min_length=1)
    data: FolderData | None = None  # None: the synthetic shapes
    training: TrainingConfig = TrainingConfig()
    test_images: int = Field(500, ge=1)
    int8: Int8Config = Int8Config()
    opset: int = Field(20, ge=17)
    parallel_training: bool = True

    @property
    def image_spec(self) -> ImageSpec:
        if self.data is None:
            return image_spec(self.training.size)
        return image_spec(self.training.size, self.data.labels, self.data.masks)

    def seeded(self, first: int | None) -> BuildConfig:
        """The same build with its members seeded `first`, `first` + 1, ... (None: the preset's own seeds): another
        set of weights, and so another model sha256, from the same recipe."""
        if first is None:
            return self
        members = tuple(
            MemberConfig.model_validate(member.model_dump() | {"seed": first + index})
            for index, member in enumerate(self.members)
        )
        return self.model_copy(update={"members": members})

    def member_fingerprint(self, member: MemberConfig) -> str:
        """Changes whenever anything that shapes this member's weights or its export changes."""
        payload = {"member": member.model_dump(), "training": self.training.model_dump(), "opset": self.opset}
        if self.data is not None:
            payload["data"] = self.data.model_dump()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, BuildConfig] = {
    # Tiny and fast, for the test suite: two width-2 members, 32x32, a few steps.
    "test": BuildConfig(
        name="shapes-test",
        members=(MemberConfig(width_scale=2, seed=1), MemberConfig(width_scale=2, seed=2)),
        training=TrainingConfig(image_size=32, batch_size=8, steps=12, learning_rate=3e-3),
        test_images=48,
        # Kept whatever a few steps of training let it lose, so that the suite always serves the int8 mode.
        int8=Int8Config(calibration_images=16, max_accuracy_loss=1.0),
    ),
    # What the service serves out of the box: two width-2 members at 48x48, trained at once, one core each
    # (more steps a second than one after the other on 2 threads each: docs/build.md). A quarter of the
    # steps warming up: with 5 %, a member could sit at its start for hundreds of steps before it learnt (at 1,000
    # steps seed 2 ended at 0.82 mean label accuracy, against 0.94 with 25 %), and 1,200 steps so warmed score as
    # 1,400 did with 5 %.
    "default": BuildConfig(
        name="shapes-ensemble",
        members=(MemberConfig(width_scale=2, seed=1), MemberConfig(width_scale=2, seed=2)),
        training=TrainingConfig(image_size=48, batch_size=16, steps=1200, warmup_fraction=0.25),
    ),
}
