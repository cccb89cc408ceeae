"""A trivial ensemble: three members whose inference costs microseconds, so that a server's own cost per request
(its HTTP parsing, JSON, middleware, metrics) is what a load test measures. Built with onnx.helper and fused by the
project's own `python -m model_build fuse`, as a user's ensemble is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.service import REPO

NAME = "trivial"
MEMBERS, FEATURES, CLASSES = 3, 8, 3
INPUT, OUTPUT = "X", "probabilities"


def member(path: Path, seed: int) -> Path:
    """sigmoid(X @ W + b): X [N, FEATURES] FP32 to one probability per class, [N, CLASSES]."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", [INPUT, "weights", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], [OUTPUT]),
        ],
        f"trivial{seed}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[
            numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "weights"),
            numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "bias"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def build(out: Path) -> Path:
    """The fused trivial ensemble in `out` (its members beside it, in `<out>-members`); `out`."""
    work = out.parent / f"{out.name}-members"
    work.mkdir(parents=True, exist_ok=True)
    members = [str(member(work / f"member{i}.onnx", seed=i)) for i in range(MEMBERS)]
    command = [sys.executable, "-m", "model_build", "fuse", *members, "--out", str(out), "--name", NAME]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise SystemExit(f"fusing the trivial ensemble failed:\n{result.stderr}")
    return out
