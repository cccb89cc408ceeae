"""Composes member ONNX models into one fused ensemble graph with onnx's own composition helpers.

    x ─ Identity ─┬─ m0_ (member 0, prefixed) ─┬─ mean / vote ─▶ y            (the members' names)
    (every input) ├─ m1_ (member 1, prefixed) ─┤
                  └─ ...                       └─ Unsqueeze, Concat ─▶ y_members [N, M, ...]

Works for any members that share their inputs (names, element types, ranks; static dims equal, dynamic ones
stay dynamic): vision or tabular, at any opset or IR version, with extra domains such as ai.onnx.ml. Outputs
present in every member with one type and a compatible shape are combined by ensemble_contract.combine's
rules. Everything is checked before any work and each error names the member, the tensor and the fix;
members are never mutated; the result passes the ONNX checker before it is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper, version_converter
from onnx.external_data_helper import uses_external_data

from ensemble_contract.combine import VOTE_TIE_TOLERANCE, Combination, Rule, normalised_weights
from ensemble_contract.datatypes import UnsupportedDatatype, is_floating, is_integer, of_numpy
from ensemble_contract.signature import DYNAMIC, Signature, TensorSpec

DEFAULT_DOMAINS = ("", "ai.onnx")
HEAD_MIN_OPSET = 9  # the head's ops (Where, for the vote, is the newest of them)


class FusionError(ValueError):
    """Members that cannot be fused, with what is wrong and how to fix it."""


@dataclass(frozen=True)
class Plan:
    """What the fused graph will be: its signature, the combinations, and the outputs left out (with why)."""

    signature: Signature
    combine: tuple[Combination, ...]
    left_out: dict[str, str]


def load_member(path: Path) -> tuple[onnx.ModelProto, bool]:
    """Reads a member with its external data, and says whether it had any; FusionError naming a missing data
    file before loading any."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and others for a corrupt file
        raise FusionError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    external = [tensor for tensor in model.graph.initializer if uses_external_data(tensor)]
    for tensor in external:
        location = next(e.value for e in tensor.external_data if e.key == "location")
        if not (path.parent / location).is_file():
            raise FusionError(
                f"{path}: initializer {tensor.name!r} keeps its data in {location!r}, which is not in "
                f"{path.parent}: put the data file beside the model, or save the model with its data inside"
            )
    onnx.load_external_data_for_model(model, str(path.parent))
    return model, bool(external)


def tensor_spec(value: onnx.ValueInfoProto, member: str) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        hint = (
            " (skl2onnx's ZipMap: convert with options={'zipmap': False})"
            if kind in ("sequence_type", "map_type")
            else ""
        )
        raise FusionError(f"{member}: {value.name!r} is a {kind.removesuffix('_type')}, not a tensor{hint}")
    tensor = value.type.tensor_type
    try:
        datatype = of_numpy(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except (UnsupportedDatatype, KeyError):
        raise FusionError(f"{member}: tensor {value.name!r} has an unsupported element type") from None
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else DYNAMIC for d in tensor.shape.dim)
    return TensorSpec(name=value.name, datatype=datatype, shape=shape)


def member_signature(model: onnx.ModelProto, member: str) -> Signature:
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(tensor_spec(v, member) for v in model.graph.input if v.name not in initializers)
    return Signature(inputs=inputs, outputs=tuple(tensor_spec(v, member) for v in model.graph.output))


def _joined_shape(specs: Sequence[TensorSpec]) -> tuple[int, ...] | None:
    """The shape every member's tensor fits: a dim static in any member is that value; None if they disagree."""
    shapes = [s.shape for s in specs if s.shape is not None]
    if not shapes:
        return None
    if len({len(s) for s in shapes}) > 1:
        raise ValueError("ranks differ")
    joined = []
    for dims in zip(*shapes, strict=True):
        static = {d for d in dims if d != DYNAMIC}
        if len(static) > 1:
            raise ValueError(f"static dims differ ({sorted(static)})")
        joined.append(static.pop() if static else DYNAMIC)
    return tuple(joined)


def _describe_all(name: str, signatures: Mapping[str, Signature], side: str) -> str:
    found = [(m, getattr(s, side)(name)) for m, s in signatures.items()]
    return ", ".join(f"{m}: {t.describe() if t else 'absent'}" for m, t in found)


def common_inputs(signatures: Mapping[str, Signature]) -> tuple[TensorSpec, ...]:
    """The inputs every member takes, or FusionError naming the member and tensor that differ."""
    first_member, first = next(iter(signatures.items()))
    names = [t.name for t in first.inputs]
    for member, signature in signatures.items():
        if sorted(t.name for t in signature.inputs) != sorted(names):
            raise FusionError(
                f"{member}: inputs {sorted(t.name for t in signature.inputs)} differ from {first_member}'s "
                f"{sorted(names)}: fuse only members that take the same inputs (rename them with "
                "onnx.compose.add_prefix or re-export)"
            )
    joined = []
    for name in names:
        specs = [s.input(name) for s in signatures.values()]
        fix = f"input {name!r} differs between members ({_describe_all(name, signatures, 'input')})"
        if len({s.datatype for s in specs if s}) > 1:
            raise FusionError(f"{fix}: export every member with the same element type")
        try:
            joined.append(TensorSpec(name=name, datatype=specs[0].datatype, shape=_joined_shape(specs)))  # type: ignore[union-attr]
        except ValueError as exc:
            raise FusionError(f"{fix}: {exc}; export every member for the same input shape") from None
    return tuple(joined)


def _default_rule(spec: TensorSpec) -> Rule | None:
    if is_floating(spec.datatype):
        return Rule.MEAN
    return Rule.VOTE if is_integer(spec.datatype) else None


def plan(
    signatures: Mapping[str, Signature],
    rules: Mapping[str, Rule] | None = None,
    *,
    stack_members: bool | Sequence[str] = True,
) -> Plan:
    """Which outputs the fused graph has and how each is combined. `rules` overrides the default rule
    (mean for floating outputs, vote for integer ones); `stack_members` says which floating outputs also get
    `<output>_members` (True: all)."""
    rules = dict(rules or {})
    inputs = common_inputs(signatures)
    first = next(iter(signatures.values()))
    combinations, outputs, left_out = [], [], {}
    for output in first.outputs:
        specs = [s.output(output.name) for s in signatures.values()]
        if any(s is None for s in specs):
            left_out[output.name] = f"not in every member ({_describe_all(output.name, signatures, 'output')})"
            continue
        if len({s.datatype for s in specs}) > 1:  # type: ignore[union-attr]
            left_out[output.name] = f"element types differ ({_describe_all(output.name, signatures, 'output')})"
            continue
        try:
            shape = _joined_shape(specs)  # type: ignore[arg-type]
        except ValueError as exc:
            left_out[output.name] = f"{exc} ({_describe_all(output.name, signatures, 'output')})"
            continue
        if shape == ():
            left_out[output.name] = "a scalar: only outputs with a batch axis are combined"
            continue
        given, natural = rules.pop(output.name, None), _default_rule(output)
        if natural is None and given is None:
            left_out[output.name] = f"{output.datatype} outputs are not combined"
            continue
        rule = given or natural
        if rule is not natural:
            raise FusionError(
                f"output {output.name!r} is {output.datatype}: combine floating outputs by mean, integer ones by vote"
            )
        if rule is Rule.VOTE and shape is None:
            raise FusionError(f"output {output.name!r} has no known rank in the members: a vote needs one")
        stacked = rule is Rule.MEAN and (
            stack_members is True or (not isinstance(stack_members, bool) and output.name in stack_members)
        )
        combination = Combination(output=output.name, rule=rule, stack_members=stacked)
        combinations.append(combination)
        outputs.append(TensorSpec(name=output.name, datatype=output.datatype, shape=shape))
        if combination.members_output is not None:
            stacked_shape = None if shape is None else (shape[0], len(signatures), *shape[1:])
            outputs.append(TensorSpec(name=combination.members_output, datatype=output.datatype, shape=stacked_shape))
    for name in rules:
        reason = left_out.get(name, "not an output of the members")
        raise FusionError(f"--combine {name}={rules[name]}: that output cannot be combined: {reason}")
    if not combinations:
        raise FusionError(f"the members have no output in common that can be combined: {left_out}")
    clash = {c.members_output for c in combinations} & {t.name for t in (*first.outputs, *first.inputs)}
    if clash - {None}:
        raise FusionError(f"the members already have output(s) {sorted(clash - {None})}: rename them")
    return Plan(Signature(inputs=inputs, outputs=tuple(outputs)), tuple(combinations), left_out)


def _opsets(models: Sequence[onnx.ModelProto]) -> dict[str, int]:
    """Each domain's highest opset among the members (the default domain under "", which the head needs even
    when no member imports it)."""
    opsets: dict[str, int] = {"": HEAD_MIN_OPSET}
    for model in models:
        for entry in model.opset_import:
            domain = "" if entry.domain in DEFAULT_DOMAINS else entry.domain
            opsets[domain] = max(opsets.get(domain, 0), entry.version)
    return opsets


def _harmonised(model: onnx.ModelProto, opsets: Mapping[str, int], ir_version: int, prefix: str) -> onnx.ModelProto:
    """A prefixed copy at the common opsets and IR version, without metadata (the ensemble writes its own)."""
    own = {("" if e.domain in DEFAULT_DOMAINS else e.domain): e.version for e in model.opset_import}
    if "" in own and own[""] != opsets[""]:
        model = version_converter.convert_version(model, opsets[""])
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in opsets.items())
    model = compose.add_prefix(model, prefix)
    model.ir_version = ir_version
    del model.metadata_props[:]
    return model


def _value_info(spec: TensorSpec, name: str | None = None) -> onnx.ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(spec.dtype)
    shape = None if spec.shape is None else [None if d == DYNAMIC else d for d in spec.shape]
    return helper.make_tensor_value_info(name or spec.name, elem, shape)


HEAD = "ensemble_head/"  # the head's own tensors, apart from any member's (members are prefixed m0_, m1_, ...)


class _Head:
    """Nodes and constants of the graph that combines the members' outputs, written for one opset. Every tensor
    it makes but the ensemble's outputs is named under HEAD."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.constants.append(numpy_helper.from_array(value, HEAD + name))
        return HEAD + name

    def node(self, op: str, inputs: Sequence[str], output: str, *, final: bool = False, **attributes: object) -> str:
        """`output` is a name under HEAD unless `final` (an output of the ensemble)."""
        output = output if final else HEAD + output
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=f"{HEAD}{op}_{output}", **attributes))
        return output

    def with_axes(
        self,
        op: str,
        x: str,
        output: str,
        axes: Sequence[int],
        since: int,
        *,
        final: bool = False,
        **attributes: object,
    ) -> str:
        """An op whose axes became an input at opset `since` (Unsqueeze, ReduceSum: 13; ReduceMax, ReduceMin: 18)."""
        if self.opset >= since:
            axes_name = self.constant(f"{output}_axes", np.asarray(axes, np.int64))
            return self.node(op, [x, axes_name], output, final=final, **attributes)
        return self.node(op, [x], output, final=final, axes=list(axes), **attributes)

    def stack(self, outputs: Sequence[str], name: str, *, final: bool = False) -> str:
        """[N, ...] x M -> [N, M, ...]."""
        expanded = [self.with_axes("Unsqueeze", o, f"{o}_expanded", [1], since=13) for o in outputs]
        return self.node("Concat", expanded, name, final=final, axis=1)

    def mean(self, outputs: Sequence[str], name: str, weights: np.ndarray | None, dtype: np.dtype) -> str:
        """The (weighted) mean; ONNX Runtime's CPU Mean has no FP64 kernel, so FP64 is a weighted sum too."""
        if weights is None and dtype != np.float64:
            return self.node("Mean", outputs, name, final=True)
        if weights is None:
            weights = np.full(len(outputs), 1 / len(outputs))
        weighted = [
            self.node("Mul", [o, self.constant(f"{o}_weight", np.asarray(w, dtype))], f"{o}_weighted")
            for o, w in zip(outputs, weights, strict=True)
        ]
        return self.node("Sum", weighted, name, final=True)

    def vote(self, outputs: Sequence[str], name: str, weights: np.ndarray, rank: int, dtype: np.dtype) -> str:
        """ensemble_contract.combine.majority_vote, as graph: M x [N, ...] -> [N, ...]. Votes are counted on
        INT64 (the one integer type every op here takes at every opset); other types are cast there and back."""
        native = dtype == np.int64
        as_int64 = (
            list(outputs) if native else [self.node("Cast", [o], f"{o}_int64", to=TensorProto.INT64) for o in outputs]
        )
        stacked = self.stack(as_int64, f"{name}_stacked")
        rows = self.with_axes("Unsqueeze", stacked, f"{name}_rows", [2], since=13)
        columns = self.with_axes("Unsqueeze", stacked, f"{name}_columns", [1], since=13)
        agree = self.node(
            "Cast", [self.node("Equal", [rows, columns], f"{name}_equal")], f"{name}_agree", to=TensorProto.FLOAT
        )
        shaped = weights.astype(np.float32).reshape((-1,) + (1,) * (rank - 1))
        votes = self.node("Mul", [agree, self.constant(f"{name}_weights", shaped)], f"{name}_votes")
        counts = self.with_axes("ReduceSum", votes, f"{name}_counts", [2], since=13, keepdims=0)
        best = self.with_axes("ReduceMax", counts, f"{name}_best", [1], since=18, keepdims=1)
        tolerance = self.constant(f"{name}_tolerance", np.float32(VOTE_TIE_TOLERANCE))
        losers = self.node("Less", [counts, self.node("Sub", [best, tolerance], f"{name}_bar")], f"{name}_losers")
        largest = self.constant(f"{name}_largest", np.asarray(np.iinfo(np.int64).max, np.int64))
        candidates = self.node("Where", [losers, largest, stacked], f"{name}_candidates")
        if native:
            return self.with_axes("ReduceMin", candidates, name, [1], since=18, final=True, keepdims=0)
        winner = self.with_axes("ReduceMin", candidates, f"{name}_winner", [1], since=18, keepdims=0)
        return self.node("Cast", [winner], name, final=True, to=helper.np_dtype_to_tensor_dtype(dtype))


def _checked(model: onnx.ModelProto, members: Sequence[onnx.ModelProto], names: Sequence[str]) -> onnx.ModelProto:
    """The fused model if it passes the ONNX checker; FusionError saying why (and which imports differ) if not."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # the checker's ValidationError, shape inference's InferenceError
        versions = {
            (name, e.domain, e.version) for model, name in zip(members, names, strict=True) for e in model.opset_import
        }
        differing = sorted(
            {d for _, d, _ in versions if len({v for _, d2, v in versions if d2 == d}) > 1} - set(DEFAULT_DOMAINS)
        )
        hint = (
            f"; the members import {', '.join(differing)} at different versions: re-export them at one version "
            "(skl2onnx: target_opset={'ai.onnx.ml': N})"
            if differing
            else ""
        )
        raise FusionError(f"the fused graph fails the ONNX checker: {str(exc).splitlines()[0]}{hint}") from None
    return model


def fuse(
    members: Sequence[onnx.ModelProto], names: Sequence[str], fusion: Plan, weights: Sequence[float] | None = None
) -> onnx.ModelProto:
    """One graph that feeds every member the same inputs and combines their outputs as `fusion` says."""
    if len(members) != len(names) or not members:
        raise FusionError("give at least one member, and one name per member")
    try:
        normalised = normalised_weights(weights, len(members)) if weights is not None else None
    except ValueError as exc:
        raise FusionError(f"--weights: {exc}") from None
    opsets = _opsets(members)
    ir_version = max(m.ir_version for m in members)
    prefixes = [f"m{i}_" for i in range(len(members))]
    try:
        prefixed = [_harmonised(m, opsets, ir_version, p) for m, p in zip(members, prefixes, strict=True)]
    except Exception as exc:  # the version converter's own errors
        raise FusionError(f"the members cannot be brought to opset {opsets['']}: {exc}") from None

    def graph_model(graph: onnx.GraphProto) -> onnx.ModelProto:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
        model.ir_version = ir_version
        return model

    inputs = fusion.signature.inputs
    front = helper.make_graph(
        [
            helper.make_node("Identity", [i.name], [p + i.name], name=f"fan_out_{p}{i.name}")
            for p in prefixes
            for i in inputs
        ],
        "fan_out",
        [_value_info(i) for i in inputs],
        [_value_info(i, p + i.name) for p in prefixes for i in inputs],
    )
    head = _Head(opsets[""])
    head_inputs = []
    for combination in fusion.combine:
        spec = fusion.signature.output(combination.output)
        assert spec is not None
        per_member = [p + spec.name for p in prefixes]
        head_inputs += [_value_info(spec, name) for name in per_member]
        if combination.rule is Rule.MEAN:
            head.mean(per_member, spec.name, normalised, spec.dtype)
            if combination.members_output is not None:
                head.stack(per_member, combination.members_output, final=True)
        else:
            head.vote(
                per_member, spec.name, normalised_weights(weights, len(members)), len(spec.shape or ()), spec.dtype
            )
    head_graph = helper.make_graph(
        head.nodes, "ensemble_head", head_inputs, [_value_info(o) for o in fusion.signature.outputs], head.constants
    )
    try:
        fused = graph_model(front)
        for member, prefix in zip(prefixed, prefixes, strict=True):
            fused = compose.merge_models(fused, member, io_map=[(prefix + i.name, prefix + i.name) for i in inputs])
        fused = compose.merge_models(fused, graph_model(head_graph), io_map=[(v.name, v.name) for v in head_inputs])
    except ValueError as exc:  # onnx.compose's checks: overlapping names, opset clashes
        raise FusionError(f"the members cannot be merged: {exc}") from None
    # Member outputs that are not combined stay internal.
    kept = set(fusion.signature.output_names)
    for output in [o for o in fused.graph.output if o.name not in kept]:
        fused.graph.output.remove(output)
    fused.graph.name = "ensemble"
    return _checked(fused, members, names)
