"""What a build trains and scores on: a source of labelled image batches, the synthetic shapes (model_build.shapes)
or a user's folder (model_build.folder), behind one interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Batch:
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray | None  # uint8 [N, H, W], class index per pixel (0: background); None without masks
    presence: np.ndarray  # float32 [N, labels], 1 where the label is present


class TrainingData(Protocol):
    """Labelled images at a given size (height, width), each split read the same way every time."""

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def has_masks(self) -> bool: ...

    def training_batch(self, member_seed: int, step: int, batch_size: int, size: tuple[int, int]) -> Batch:
        """The images of one training step: a function of its arguments alone (reproducible, resumable)."""
        ...

    def validation_set(self, size: tuple[int, int]) -> Batch | None:
        """What picks the best checkpoint (None: the last one is kept)."""
        ...

    def test_set(self, size: tuple[int, int], count: int) -> Batch:
        """The held-out images the manifest's scores are measured on (at most `count`)."""
        ...

    def calibration_set(self, size: tuple[int, int], count: int) -> Batch:
        """Training images for the int8 graph's calibration."""
        ...
