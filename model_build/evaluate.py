"""Held-out metrics, computed from probabilities so that they score exactly what is served."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemble_contract.manifest import Metrics
from model_build.config import CLASS_PROBS, IMAGE_INPUT, MASK_PROBS
from model_build.data import Batch
from model_build.verify import cpu_session, run_in_batches


def score(class_probs: np.ndarray, mask_probs: np.ndarray | None, truth: Batch, threshold: float = 0.5) -> Metrics:
    """Mean per-label accuracy (the published comparison's metric), exact match, and mean IoU of the masks (when
    the model and the data have them)."""
    predicted = class_probs >= threshold
    present = truth.presence >= 0.5
    correct = predicted == present
    return Metrics(
        mean_label_accuracy=float(correct.mean(axis=0).mean()),
        exact_match_accuracy=float(correct.all(axis=1).mean()),
        mean_iou=None if mask_probs is None or truth.masks is None else mean_iou(mask_probs, truth.masks),
        images=len(truth.presence),
    )


def mean_iou(mask_probs: np.ndarray, masks: np.ndarray) -> float:
    predicted_mask = mask_probs.argmax(axis=1)
    ious = []
    for cls in range(mask_probs.shape[1]):
        union = np.logical_or(predicted_mask == cls, masks == cls).sum()
        if union:
            ious.append(np.logical_and(predicted_mask == cls, masks == cls).sum() / union)
    return float(np.mean(ious))


def score_model(path: Path, truth: Batch, inputs: np.ndarray) -> Metrics:
    """Scores the ONNX model at `path` (a member, or a fused graph) on `inputs`, the normalised `truth.images`."""
    session = cpu_session(path)
    names = [CLASS_PROBS] + [MASK_PROBS for output in session.get_outputs() if output.name == MASK_PROBS]
    outputs = run_in_batches(session, {IMAGE_INPUT: inputs}, names)
    return score(outputs[CLASS_PROBS], outputs.get(MASK_PROBS), truth)
