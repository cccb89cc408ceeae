"""The model runtime: ONNX Runtime sessions for the fused graphs and for the members, and the modes.

Every mode takes the same input batch and returns the same EnsembleOutputs, so pre- and post-processing
never know which mode ran. The graph modes (fused, and fused-int8 when the build shipped it) run one session;
sequential and parallel mode each have their own member sessions, because their thread budgets differ
(parallel: the members share the cores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.errors import StartupError
from app.manifest import CLASS_PROBS, INPUT_NAME, MASK_PROBS, MEMBER_CLASS_PROBS, Manifest, load_manifest
from app.modes import Mode
from app.priority import lower_thread_priority
from app.settings import Settings

MEMBER_OUTPUTS = (CLASS_PROBS, MASK_PROBS)
FUSED_OUTPUTS = (CLASS_PROBS, MASK_PROBS, MEMBER_CLASS_PROBS)
PROVIDERS = ("CPUExecutionProvider",)
ORT_ERRORS_ONLY = 3


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


@dataclass(frozen=True)
class EnsembleOutputs:
    class_probs: np.ndarray  # float32 [N, C], mean of the members
    mask_probs: np.ndarray  # float32 [N, C + 1, H, W], mean of the members
    member_class_probs: np.ndarray  # float32 [N, M, C], in manifest order

    @classmethod
    def average(cls, members: Sequence[Sequence[np.ndarray]]) -> EnsembleOutputs:
        """What the fused graph computes, from each member's (class_probs, mask_probs)."""
        stacked = np.stack([class_probs for class_probs, _ in members], axis=1)
        masks = np.mean(np.stack([mask_probs for _, mask_probs in members]), axis=0)
        return cls(stacked.mean(axis=1), masks, stacked)


GRAPH_MODES = (Mode.FUSED, Mode.FUSED_INT8)
MEMBER_MODES = (Mode.SEQUENTIAL, Mode.PARALLEL)


def served_modes(manifest: Manifest) -> tuple[Mode, ...]:
    """Every mode but fused-int8, which needs the int8 graph the build ships only when it keeps the accuracy."""
    return tuple(mode for mode in Mode if mode is not Mode.FUSED_INT8 or manifest.ensemble_int8 is not None)


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
        contract = _contract(manifest)
        graph_files = {Mode.FUSED: manifest.ensemble, Mode.FUSED_INT8: manifest.ensemble_int8}
        graphs = {
            mode: _open(root / file.path, plans[mode], contract[mode])
            for mode, file in graph_files.items()
            if file is not None
        }
        members = {
            mode: [_open(root / member.file.path, plans[mode], contract[mode]) for member in manifest.members]
            for mode in MEMBER_MODES
        }
        runtime = cls(manifest, graphs, members, plans)
        runtime.warm_up()
        return runtime

    def infer(self, batch: np.ndarray, mode: Mode) -> EnsembleOutputs:
        """batch: float32 [N, 3, H, W], preprocessed."""
        feed = {INPUT_NAME: batch}
        if mode in self._graphs:
            return EnsembleOutputs(*self._graphs[mode].run(list(FUSED_OUTPUTS), feed))
        run_all = self._member_pool.map if mode is Mode.PARALLEL else map
        return EnsembleOutputs.average(
            list(run_all(lambda session: session.run(list(MEMBER_OUTPUTS), feed), self._members[mode]))
        )

    def warm_up(self) -> None:
        """Runs each mode once, so the first request does not pay for allocations and thread start-up."""
        spec = self.manifest.input
        batch = np.zeros((1, 3, spec.height, spec.width), dtype=np.float32)
        expected = _contract(self.manifest)[Mode.FUSED]
        for mode in self.modes:
            outputs = self.infer(batch, mode)
            for name in FUSED_OUTPUTS:
                actual, wanted = getattr(outputs, name).shape, (1, *expected[name][1:])
                if actual != wanted:
                    raise StartupError(
                        f"{mode} mode returned {name} of shape {list(actual)}, the manifest implies "
                        f"{list(wanted)}: rebuild the models"
                    )

    def close(self) -> None:
        self._member_pool.shutdown(wait=False, cancel_futures=True)


def _contract(manifest: Manifest) -> dict[Mode, dict[str, tuple[int | None, ...]]]:
    """Tensor names and shapes the manifest implies, for the fused graph and for a member (None: any size)."""
    spec, labels = manifest.input, len(manifest.labels)
    member: dict[str, tuple[int | None, ...]] = {
        INPUT_NAME: (None, 3, spec.height, spec.width),
        CLASS_PROBS: (None, labels),
        MASK_PROBS: (None, labels + 1, spec.height, spec.width),
    }
    graph = member | {MEMBER_CLASS_PROBS: (None, len(manifest.members), labels)}
    return {mode: graph for mode in GRAPH_MODES} | {mode: member for mode in MEMBER_MODES}


def _open(path: Path, plan: ThreadPlan, contract: Mapping[str, tuple[int | None, ...]]) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(str(path), plan.session_options(), providers=list(PROVIDERS))
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"ONNX Runtime cannot load {path}: {reason}") from None
    tensors = {t.name: t for t in (*session.get_inputs(), *session.get_outputs())}
    for name, dims in contract.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise StartupError(f"{path} has no tensor named {name!r}; it has {sorted(tensors)}")
        if tensor.type != "tensor(float)" or not _shape_fits(tensor.shape, dims):
            raise StartupError(
                f"{path}: tensor {name!r} is {tensor.type} {tensor.shape}, the manifest implies float32 "
                f"{[d if d is not None else 'N' for d in dims]}"
            )
    return session


def _shape_fits(actual: Sequence[int | str | None], expected: Sequence[int | None]) -> bool:
    """Symbolic or unknown dimensions fit anything; fixed ones must match."""
    return len(actual) == len(expected) and all(
        want is None or not isinstance(have, int) or have == want for have, want in zip(actual, expected, strict=True)
    )
