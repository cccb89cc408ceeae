"""Composes member ONNX models into one fused ensemble graph with onnx's own composition helpers.

    image ─ Identity ─┬─ m0_ (member 0, prefixed) ─┬─ Mean ─▶ class_probs, mask_probs
                      ├─ m1_ (member 1, prefixed) ─┤
                      └─ ...                       └─ Unsqueeze, Concat ─▶ member_class_probs [N, M, C]

Works for any members with the same signature, ours or a user's: `image` [N, 3, H, W] float32 in,
`class_probs` [N, C] and `mask_probs` [N, C + 1, H, W] out. Inputs are checked before any work and
each error names the member and tensor at fault; members are never mutated; the result passes the
ONNX checker before it is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, compose, helper, version_converter

from app.manifest import CLASS_PROBS, INPUT_NAME, MASK_PROBS, MEMBER_CLASS_PROBS


class FusionError(ValueError):
    """Members that cannot be fused, with what is wrong and how to fix it."""


@dataclass(frozen=True)
class Signature:
    """The static part of a member's interface; every member of an ensemble must share it."""

    height: int
    width: int
    labels: int


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def signature(model: onnx.ModelProto, member: str) -> Signature:
    """Reads and checks a member's interface; raises FusionError naming the tensor that does not fit."""
    inputs = {v.name: v for v in model.graph.input}
    initializers = {i.name for i in model.graph.initializer}
    outputs = {v.name: v for v in model.graph.output}
    real_inputs = sorted(set(inputs) - initializers)
    if real_inputs != [INPUT_NAME]:
        raise FusionError(f"{member}: must have exactly one input named {INPUT_NAME!r}, has {real_inputs}")
    missing = {CLASS_PROBS, MASK_PROBS} - set(outputs)
    if missing:
        raise FusionError(f"{member}: lacks output(s) {sorted(missing)}; has {sorted(outputs)}")
    for value in (inputs[INPUT_NAME], outputs[CLASS_PROBS], outputs[MASK_PROBS]):
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise FusionError(f"{member}: tensor {value.name!r} must be float32")
    image, class_probs, mask_probs = (_dims(v) for v in (inputs[INPUT_NAME], outputs[CLASS_PROBS], outputs[MASK_PROBS]))
    if len(image) != 4 or image[1] != 3 or not all(isinstance(d, int) and d > 0 for d in image[2:]):
        raise FusionError(f"{member}: input {INPUT_NAME!r} must be [N, 3, H, W] with fixed H and W, is {image}")
    if len(class_probs) != 2 or not isinstance(class_probs[1], int) or class_probs[1] < 1:
        raise FusionError(f"{member}: output {CLASS_PROBS!r} must be [N, labels], is {class_probs}")
    expected_mask = [class_probs[1] + 1, image[2], image[3]]
    if len(mask_probs) != 4 or mask_probs[1:] != expected_mask:
        raise FusionError(
            f"{member}: output {MASK_PROBS!r} must be [N, {', '.join(map(str, expected_mask))}], is {mask_probs}"
        )
    return Signature(height=image[2], width=image[3], labels=class_probs[1])


def _default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _harmonised(model: onnx.ModelProto, opset: int, ir_version: int, prefix: str) -> onnx.ModelProto:
    """A prefixed copy at the common opset and IR version, without metadata (the ensemble writes its own)."""
    if _default_opset(model) != opset:
        model = version_converter.convert_version(model, opset)
    model = compose.add_prefix(model, prefix)
    model.ir_version = ir_version
    del model.metadata_props[:]
    return model


def _graph_model(graph: onnx.GraphProto, opset: int, ir_version: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def fuse(members: Sequence[onnx.ModelProto], names: Sequence[str]) -> onnx.ModelProto:
    """One graph that feeds every member the same input and averages their probabilities."""
    if len(members) != len(names) or not members:
        raise FusionError("give at least one member, and one name per member")
    signatures = {name: signature(model, name) for model, name in zip(members, names, strict=True)}
    if len(set(signatures.values())) > 1:
        found = ", ".join(f"{n}: {s.height}x{s.width} input, {s.labels} labels" for n, s in signatures.items())
        raise FusionError(f"members have different signatures ({found}); fuse only members of one task")
    first = signatures[names[0]]
    opset = max(_default_opset(m) for m in members)
    ir_version = max(m.ir_version for m in members)
    prefixes = [f"m{i}_" for i in range(len(members))]
    prefixed = [_harmonised(m, opset, ir_version, p) for m, p in zip(members, prefixes, strict=True)]

    batch = "batch"
    front = helper.make_graph(
        [helper.make_node("Identity", [INPUT_NAME], [p + INPUT_NAME], name=f"fan_out_{p}") for p in prefixes],
        "fan_out",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, first.height, first.width])],
        [
            helper.make_tensor_value_info(p + INPUT_NAME, TensorProto.FLOAT, [batch, 3, first.height, first.width])
            for p in prefixes
        ],
    )
    fused = _graph_model(front, opset, ir_version)
    for member, prefix in zip(prefixed, prefixes, strict=True):
        fused = compose.merge_models(fused, member, io_map=[(prefix + INPUT_NAME, prefix + INPUT_NAME)])

    mask_shape = [batch, first.labels + 1, first.height, first.width]
    head = helper.make_graph(
        [
            helper.make_node("Mean", [p + CLASS_PROBS for p in prefixes], [CLASS_PROBS], name="ensemble_class_mean"),
            helper.make_node("Mean", [p + MASK_PROBS for p in prefixes], [MASK_PROBS], name="ensemble_mask_mean"),
            *(
                helper.make_node("Unsqueeze", [p + CLASS_PROBS, "stack_axis"], [p + "stacked"], name=f"stack_{p}")
                for p in prefixes
            ),
            helper.make_node(
                "Concat", [p + "stacked" for p in prefixes], [MEMBER_CLASS_PROBS], axis=1, name="ensemble_members"
            ),
        ],
        "ensemble_head",
        [helper.make_tensor_value_info(p + CLASS_PROBS, TensorProto.FLOAT, [batch, first.labels]) for p in prefixes]
        + [helper.make_tensor_value_info(p + MASK_PROBS, TensorProto.FLOAT, mask_shape) for p in prefixes],
        [
            helper.make_tensor_value_info(CLASS_PROBS, TensorProto.FLOAT, [batch, first.labels]),
            helper.make_tensor_value_info(MASK_PROBS, TensorProto.FLOAT, mask_shape),
            helper.make_tensor_value_info(MEMBER_CLASS_PROBS, TensorProto.FLOAT, [batch, len(members), first.labels]),
        ],
        initializer=[helper.make_tensor("stack_axis", TensorProto.INT64, [1], [1])],
    )
    head_inputs = [v.name for v in head.input]
    fused = compose.merge_models(fused, _graph_model(head, opset, ir_version), io_map=[(n, n) for n in head_inputs])
    fused.graph.name = "ensemble"
    onnx.checker.check_model(fused, full_check=True)
    return fused
