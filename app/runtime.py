"""The model runtime: ONNX Runtime sessions for the fused graphs and for the members, and the modes.

Every mode takes the same feeds and returns the fused graph's outputs by name, so the protocols never know
which mode ran. Graph modes run one session; member modes run one session per member and combine their outputs
with ensemble_contract.combine, the function the build checks the fused graph against. Sequential and parallel
have their own member sessions, because their thread budgets differ (parallel: the members share the cores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.errors import StartupError
from app.priority import lower_thread_priority
from app.settings import Settings
from ensemble_contract.combine import combine
from ensemble_contract.datatypes import UnsupportedDatatype, of_onnxruntime
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import MODES, Mode, Runs, served_modes
from ensemble_contract.signature import TensorSpec

PROVIDERS = ("CPUExecutionProvider",)
ORT_ERRORS_ONLY = 3
Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class ThreadPlan:
    """The ONNX Runtime thread options of one mode's sessions."""

    intra_op_threads: int
    inter_op_threads: int
    allow_spinning: bool

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        spinning = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        options.log_severity_level = ORT_ERRORS_ONLY
        return options

    def describe(self) -> str:
        spinning = "on" if self.allow_spinning else "off"
        return f"intra_op={self.intra_op_threads} inter_op={self.inter_op_threads} spinning={spinning}"


def thread_plans(settings: Settings, members: int, modes: Sequence[Mode]) -> dict[Mode, ThreadPlan]:
    return {
        mode: ThreadPlan(settings.intra_op_threads(mode, members), settings.inter_op_threads, settings.allow_spinning)
        for mode in modes
    }


class EnsembleRuntime:
    """Owns the sessions; `infer` runs one batch in the mode asked for. Thread-safe."""

    def __init__(
        self,
        manifest: Manifest,
        graphs: Mapping[Mode, ort.InferenceSession],
        members: Mapping[Mode, Sequence[ort.InferenceSession]],
        plans: Mapping[Mode, ThreadPlan],
    ) -> None:
        self.manifest = manifest
        self.plans = dict(plans)
        self.modes = served_modes(manifest)
        self._graphs = dict(graphs)
        self._members = dict(members)
        self._member_pool = ThreadPoolExecutor(
            len(manifest.members), thread_name_prefix="member", initializer=lower_thread_priority
        )

    @classmethod
    def load(cls, settings: Settings) -> EnsembleRuntime:
        """Verifies the model directory, opens every session and warms each mode up; StartupError if any fails."""
        root = settings.model_dir
        try:
            manifest = load_manifest(root)
        except Exception as exc:  # ManifestError, or an unreadable directory
            raise StartupError(f"model directory {root} is unusable: {exc}") from None
        modes = served_modes(manifest)
        plans = thread_plans(settings, len(manifest.members), modes)
        graph_tensors = (*manifest.signature.inputs, *manifest.signature.outputs)
        member_tensors = (*manifest.signature.inputs, *(manifest.signature.output(n) for n in manifest.member_outputs))
        graphs, members = {}, {}
        for mode in modes:
            spec = MODES[mode]
            if spec.runs is Runs.GRAPH:
                file = spec.graph_file(manifest)
                assert file is not None  # served_modes keeps only the graphs the directory has
                graphs[mode] = _open(root / file.path, plans[mode], graph_tensors)
            else:
                members[mode] = [_open(root / m.file.path, plans[mode], member_tensors) for m in manifest.members]
        runtime = cls(manifest, graphs, members, plans)
        runtime.warm_up()
        return runtime

    def infer(self, feeds: Mapping[str, np.ndarray], mode: Mode) -> Tensors:
        """Every output of the fused graph, by name, computed in `mode`."""
        if mode in self._graphs:
            session = self._graphs[mode]
            return dict(zip(self.manifest.signature.output_names, session.run(self._output_names, feeds), strict=True))
        names = list(self.manifest.member_outputs)

        def run(session: ort.InferenceSession) -> Tensors:
            return dict(zip(names, session.run(names, feeds), strict=True))

        run_all = self._member_pool.map if MODES[mode].concurrent_members else map
        return combine(list(run_all(run, self._members[mode])), self.manifest.combine, self.manifest.weights)

    @property
    def _output_names(self) -> list[str]:
        return list(self.manifest.signature.output_names)

    def warm_up(self) -> None:
        """Runs each mode once, so the first request does not pay for allocations and thread start-up, and checks
        that each gives the manifest's outputs."""
        feeds = self.manifest.example_inputs()
        for mode in self.modes:
            outputs = self.infer(feeds, mode)
            for spec in self.manifest.signature.outputs:
                actual = outputs[spec.name]
                if not spec.fits(actual.shape) or actual.dtype != spec.dtype:
                    raise StartupError(
                        f"{mode} mode returned {spec.name} as {actual.dtype} {list(actual.shape)}, the manifest says "
                        f"{spec.describe()}: rebuild the model directory"
                    )

    def close(self) -> None:
        self._member_pool.shutdown(wait=False, cancel_futures=True)


def _open(path: Path, plan: ThreadPlan, tensors: Sequence[TensorSpec | None]) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(str(path), plan.session_options(), providers=list(PROVIDERS))
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"ONNX Runtime cannot load {path}: {reason}") from None
    found = {t.name: t for t in (*session.get_inputs(), *session.get_outputs())}
    for spec in tensors:
        assert spec is not None  # the manifest's validator checks every combined output is in the signature
        tensor = found.get(spec.name)
        if tensor is None:
            raise StartupError(f"{path} has no tensor named {spec.name!r}; it has {sorted(found)}")
        try:
            datatype = of_onnxruntime(tensor.type)
        except UnsupportedDatatype:
            datatype = tensor.type
        shape = [d if isinstance(d, int) else -1 for d in tensor.shape]
        if datatype != spec.datatype or not (spec.shape is None or _compatible(shape, spec.shape)):
            raise StartupError(
                f"{path}: tensor {spec.name!r} is {datatype} {tensor.shape}, the manifest says {spec.describe()}"
            )
    return session


def _compatible(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """Dynamic dimensions on either side fit anything; static ones must match."""
    return len(actual) == len(expected) and all(a == e or -1 in (a, e) for a, e in zip(actual, expected, strict=True))
