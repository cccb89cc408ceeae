"""Hand-made ONNX members with our signature, built without torch or this project's build step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_build.config import CLASS_PROBS, IMAGE_INPUT, MASK_PROBS


def hand_made_member(
    path: Path,
    size: int,
    labels: int,
    seed: int,
    *,
    output: str = CLASS_PROBS,
    lookup_table: int | None = None,
    batch: str | int = "N",
    mix_rows: bool = False,
) -> Path:
    """A 1x1 conv segmenter and a pooled classifier, saved to `path`.

    With `lookup_table=T` the class logits are shifted by table[floor(max(image))], a table of T zeros: the same
    answers, but ONNX Runtime fails at run time on an input holding a value of T or more. A number for `batch`
    fixes the batch dimension. With `mix_rows` the pooled features are centred on their mean over the batch, so
    each row's answer depends on the other rows (as batch statistics or a per-batch quantisation scale make it).
    """
    rng = np.random.default_rng(seed)
    initializers = [
        numpy_helper.from_array(rng.normal(size=(labels + 1, 3, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(3, labels)).astype(np.float32), "dense_w"),
    ]
    nodes = [
        helper.make_node("Conv", [IMAGE_INPUT, "conv_w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [MASK_PROBS], axis=1),
        helper.make_node("GlobalAveragePool", [IMAGE_INPUT], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
    ]
    features = "flat"
    if mix_rows:
        nodes += [
            helper.make_node("ReduceMean", ["flat"], ["batch_mean"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["flat", "batch_mean"], ["centred"]),
        ]
        features = "centred"
    nodes.append(helper.make_node("MatMul", [features, "dense_w"], ["class_logits"]))
    class_logits = "class_logits"
    if lookup_table is not None:
        initializers.append(numpy_helper.from_array(np.zeros(lookup_table, np.float32), "table"))
        nodes += [
            helper.make_node("ReduceMax", [IMAGE_INPUT], ["largest"], keepdims=0),
            helper.make_node("Floor", ["largest"], ["floor"]),
            helper.make_node("Cast", ["floor"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["looked_up"]),
            helper.make_node("Add", ["class_logits", "looked_up"], ["shifted"]),
        ]
        class_logits = "shifted"
    nodes.append(helper.make_node("Sigmoid", [class_logits], [output]))
    graph = helper.make_graph(
        nodes,
        "hand_made_member",
        [helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.FLOAT, [batch, 3, size, size])],
        [
            helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, labels]),
            helper.make_tensor_value_info(MASK_PROBS, TensorProto.FLOAT, [batch, labels + 1, size, size]),
        ],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


FRAGILE_SIZE, FRAGILE_LABELS, FRAGILE_TABLE = 8, 3, 16


def member_failing_on_large_values(path: Path, seed: int) -> Path:
    """A valid member whose graph fails inside ONNX Runtime when the input holds a value of FRAGILE_TABLE or more.

    It looks up floor(max(image)) in a table of FRAGILE_TABLE entries (Gather); any value from a normalised picture
    or the build's random check inputs is a valid index, 1000 is not, and ONNX Runtime raises at run time.
    """
    return hand_made_member(path, FRAGILE_SIZE, FRAGILE_LABELS, seed, lookup_table=FRAGILE_TABLE)
