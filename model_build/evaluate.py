"""Held-out metrics, computed from probabilities so that they score exactly what is served."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemble_contract.manifest import Metrics
from model_build.config import CLASS_PROBS, IMAGE_INPUT, MASK_PROBS
from model_build.shapes import Batch
from model_build.verify import cpu_session, run_in_batches


def score(class_probs: np.ndarray, mask_probs: np.ndarray, truth: Batch, threshold: float = 0.5) -> Metrics:
    """Mean per-label accuracy (the published comparison's metric), exact match, and mean IoU of the masks."""
    predicted = class_probs >= threshold
    present = truth.presence >= 0.5
    correct = predicted == present
    predicted_mask = mask_probs.argmax(axis=1)
    ious = []
    for cls in range(mask_probs.shape[1]):
        union = np.logical_or(predicted_mask == cls, truth.masks == cls).sum()
        if union:
            ious.append(np.logical_and(predicted_mask == cls, truth.masks == cls).sum() / union)
    return Metrics(
        mean_label_accuracy=float(correct.mean(axis=0).mean()),
        exact_match_accuracy=float(correct.all(axis=1).mean()),
        mean_iou=float(np.mean(ious)),
        images=len(truth.presence),
    )


def score_model(path: Path, truth: Batch, inputs: np.ndarray) -> Metrics:
    """Scores the ONNX model at `path` (a member, or a fused graph) on `inputs`, the normalised `truth.images`."""
    outputs = run_in_batches(cpu_session(path), {IMAGE_INPUT: inputs}, [CLASS_PROBS, MASK_PROBS])
    return score(outputs[CLASS_PROBS], outputs[MASK_PROBS], truth)
