"""Real ONNX graphs that nobody here designed, made in test fixtures: torchvision classifiers (random weights,
dynamic batch, height and width) and scikit-learn classifiers converted by skl2onnx (ai.onnx.ml operators,
different opsets and IR versions)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx

VISION_ARCHITECTURES = ("resnet18", "mobilenet_v3_small")
VISION_CLASSES = 10
TABULAR_FEATURES, TABULAR_CLASSES = 6, 3


def _torchvision_models() -> types.ModuleType:
    """torchvision.models without its compiled detection operators: PyPI's torchvision wheel is built against
    another torch build than the pinned CPU one, so registering torchvision::nms fails on import; the
    classification architectures use none of those operators."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    from torchvision import models

    return models


def export_vision_members(out: Path) -> list[Path]:
    import torch

    models = _torchvision_models()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    paths = []
    for architecture in VISION_ARCHITECTURES:
        torch.manual_seed(0)
        model = getattr(models, architecture)(num_classes=VISION_CLASSES).eval()
        dims = {
            0: torch.export.Dim("batch", min=1, max=64),
            2: torch.export.Dim("height", min=32, max=512),
            3: torch.export.Dim("width", min=32, max=512),
        }
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (torch.zeros(2, 3, 64, 64),),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=(dims,),
                opset_version=18,
                external_data=False,
                verbose=False,
            )
        paths.append(out / f"{architecture}.onnx")
        program.save(str(paths[-1]))
    return paths


def tabular_data(rows: int = 400) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(rows, TABULAR_FEATURES, n_classes=TABULAR_CLASSES, n_informative=4, random_state=0)
    return x.astype(np.float32), y.astype(np.int64)


def export_tabular_members(out: Path, *, zipmap: bool = False) -> list[Path]:
    """A random forest (ai.onnx.ml opset 1, onnx opset 15), a logistic regression (opset 17) and gradient
    boosting (the converter's newest opset), each giving `label` int64 [N] and `probabilities` [N, 3]."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x, y = tabular_data()
    classifiers = {
        "forest": (RandomForestClassifier(10, max_depth=5, random_state=0), {"": 15, "ai.onnx.ml": 1}),
        "logistic": (LogisticRegression(max_iter=500), 17),
        "boosting": (GradientBoostingClassifier(n_estimators=10, random_state=0), None),
    }
    paths = []
    for name, (classifier, opset) in classifiers.items():
        classifier.fit(x[:300], y[:300])
        model = to_onnx(classifier, x[:1], options={"zipmap": zipmap}, target_opset=opset)
        paths.append(out / f"{name}{'-zipmap' if zipmap else ''}.onnx")
        onnx.save(model, paths[-1])
    return paths
