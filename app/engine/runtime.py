"""The model runtime: sessions for the fused graphs and for the members, and the modes.

Every mode takes the same feeds and returns the fused graph's outputs by name, so the protocols never know
which mode ran. Graph modes run one session; member modes run one session per member and combine their outputs
with ensemble_contract.combine, the function the build checks the fused graph against. Sequential and parallel
have their own member sessions, because their thread budgets differ (parallel: the members share the cores).

Each mode's sessions run on ONNX Runtime or, where ENGINE allows it, on OpenVINO (app.engine.engines): at load, a mode
keeps OpenVINO only where its outputs on the example input equal ONNX Runtime's within the manifest's tolerance and,
with ENGINE=auto, where it ran faster in a fraction of a second of runs taking turns with ONNX Runtime's.

Every ONNX Runtime session takes its working memory from one arena per process (its shared environment allocator), so
that the arenas of four modes' sessions do not each grow to the largest batch: the process's memory grows
with the requests running at once, which the memory budget bounds (app.core.memory), not with the number of modes.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.engine.cpu import new_threads, threads_cpu_seconds, timed_cpu
from app.engine.engines import EngineChoice, Session, open_openvino, openvino_missing
from app.engine.priority import lower_thread_priority
from app.engine.timing import Timing
from app.errors import StartupError
from app.settings import Engine, Spinning
from ensemble_contract.combine import combine
from ensemble_contract.datatypes import UnsupportedDatatype, of_onnxruntime
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import MODES, Mode, intra_op_threads, served_modes
from ensemble_contract.signature import TensorSpec
from ensemble_contract.tolerance import disagreement

PROVIDERS = ("CPUExecutionProvider",)
ORT_ERRORS_ONLY = 3
# Rows computed in a batch of two and alone agree within this, relative to the output's scale, or not at all.
ROW_TOLERANCE = 1e-5
ENGINE_TRIAL_S = 0.2  # ENGINE=auto: each mode's runs on the two engines, taking turns, at most this long
ENGINE_TRIAL_RUNS = 3, 25  # ... and at least, at most this many runs on each
Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class RuntimeOptions:
    """What EnsembleRuntime.load reads: the model directory, the layout (inference slots on this process's cores),
    the sessions' thread options and the engine (ENGINE resolved). Made from the settings by
    app.core.model.runtime_options; a layout is a copy with other slots (dataclasses.replace)."""

    model_dir: Path
    cores: int  # what the sessions are sized by: the process's cores, or its share of them with worker processes
    inference_slots: int
    fused_intra_op_threads: int | None  # None: the mode's share of the cores (ensemble_contract.modes)
    sequential_intra_op_threads: int | None
    parallel_intra_op_threads: int | None
    inter_op_threads: int
    spinning: Spinning
    engine: Engine


@dataclass(frozen=True)
class ThreadPlan:
    """The thread options of one mode's sessions (OpenVINO's: the intra-op threads; it neither spins nor has
    inter-op threads)."""

    intra_op_threads: int
    inter_op_threads: int
    spinning: Spinning

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        spinning = "0" if self.spinning is Spinning.OFF else "1"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        if self.spinning is Spinning.DURING_RUNS:
            # Between the many small operators of one inference (where spinning pays), never idle after it.
            options.add_session_config_entry("session.force_spinning_stop", "1")
        options.add_session_config_entry("session.use_env_allocators", "1")  # the process's one arena
        # ONNX Runtime plans one block per input shape on top of the arena's chunks, which left the arena at twice a
        # large batch's working memory; without it, the arena stays at the largest working set (2 % slower here).
        options.enable_mem_pattern = False
        options.log_severity_level = ORT_ERRORS_ONLY
        return options

    def describe(self) -> str:
        return f"intra_op={self.intra_op_threads} inter_op={self.inter_op_threads} spinning={self.spinning}"


_shared_arena = threading.Lock()
_shared_arena_registered = False


def share_one_arena() -> None:
    """Registers the process's one CPU arena, which every session then uses (session.use_env_allocators); once per
    process, before the first session that uses it."""
    global _shared_arena_registered
    with _shared_arena:
        if not _shared_arena_registered:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's defaults
            _shared_arena_registered = True


def session_threads(options: RuntimeOptions, mode: Mode, members: int) -> int:
    """The intra-op threads of each session `mode` runs: its setting, or its share of the cores under the
    inference slots (ensemble_contract.modes.intra_op_threads)."""
    configured = {
        Mode.FUSED: options.fused_intra_op_threads,
        Mode.FUSED_INT8: options.fused_intra_op_threads,
        Mode.SEQUENTIAL: options.sequential_intra_op_threads,
        Mode.PARALLEL: options.parallel_intra_op_threads,
    }[mode]
    if configured is not None:
        return configured
    return intra_op_threads(mode, options.cores, members, options.inference_slots)


def thread_plans(options: RuntimeOptions, members: int, modes: Sequence[Mode]) -> dict[Mode, ThreadPlan]:
    return {
        mode: ThreadPlan(session_threads(options, mode, members), options.inter_op_threads, options.spinning)
        for mode in modes
    }


@dataclass
class SessionSet:
    """The sessions one inference slot runs: one per graph mode, the members' per member mode, and the threads
    of their ONNX Runtime pools (none when every session runs on its caller's thread)."""

    graphs: dict[Mode, Session]
    members: dict[Mode, list[Session]]
    pool_threads: dict[Mode, frozenset[int]]  # each mode's sessions' pools (the threads its engine started)
    _charged: dict[Mode, float] = field(default_factory=dict)

    def charge_pool_cpu(self, mode: Mode) -> float:
        """CPU seconds `mode`'s pools ran since its last charge, spinning included. Only one slot uses a set that
        has pools (EnsembleRuntime makes sure of it), so the charge goes to that slot's request."""
        threads = self.pool_threads.get(mode)
        if not threads:
            return 0.0
        total = threads_cpu_seconds(threads)
        charged, self._charged[mode] = total - self._charged.get(mode, 0.0), total
        return charged

    def adopt(self, mode: Mode, other: SessionSet) -> None:
        """Runs `mode` on `other`'s sessions (and charges their pools) from now on."""
        if mode in other.graphs:
            self.graphs[mode] = other.graphs[mode]
        else:
            self.members[mode] = other.members[mode]
        self.pool_threads[mode] = other.pool_threads[mode]
        self._charged.pop(mode, None)


@dataclass(frozen=True)
class Measured:
    """A run's outputs and its timing: the runtime's inference_s (reading the pools' counters not included) and
    cpu_s (every thread that ran it), to which the scheduler adds its wait and its batch."""

    outputs: Tensors
    timing: Timing


def usable_manifest(root: Path, *, verify_files: bool = True) -> Manifest:
    """The model directory's manifest (each file checked against it, with verify_files); StartupError saying why not."""
    try:
        return load_manifest(root, verify_files=verify_files)
    except Exception as exc:  # ManifestError, or an unreadable directory
        raise StartupError(f"model directory {root} is unusable: {exc}") from None


class EnsembleRuntime:
    """Owns the sessions; `infer` runs one batch in the mode asked for. Thread-safe, for up to `slots` callers
    at once (the scheduler's inference slots): each takes a session set for the length of its call.
    Slots get sets of their own when a mode's sessions use several threads (a session's intra-op pool is one,
    whatever calls it); with one thread a session runs on its caller's thread and every slot shares one set."""

    def __init__(
        self,
        manifest: Manifest,
        session_sets: Sequence[SessionSet],
        plans: Mapping[Mode, ThreadPlan],
        slots: int,
        engines: Mapping[Mode, EngineChoice],
    ) -> None:
        self.manifest = manifest
        self.plans = dict(plans)
        self.engines = dict(engines)  # what runs each mode's sessions, and why
        self.slots = slots
        self.modes = served_modes(manifest)
        self.session_sets = tuple(session_sets)
        self.typical_inference_s = 0.0  # measured by warm_up
        self.unbatchable: str | None = None  # why requests never run as one inference (found by warm_up), if so
        has_pools = any(threads for sessions in session_sets for threads in sessions.pool_threads.values())
        if len(self.session_sets) not in (1, slots) or (len(self.session_sets) < slots and has_pools):
            raise ValueError("give one session set per slot, or one set without pools that every slot shares")
        self._free: queue.SimpleQueue[SessionSet] = queue.SimpleQueue()
        for slot in range(slots):
            self._free.put(self.session_sets[slot % len(self.session_sets)])
        self._member_pool = ThreadPoolExecutor(
            len(manifest.members) * slots, thread_name_prefix="member", initializer=lower_thread_priority
        )

    def describe_sessions(self) -> dict[Mode, str]:
        """Each mode's engine and thread options, e.g. 'onnxruntime intra_op=2 inter_op=1 spinning=during-runs'."""
        return {mode: f"{self.engines[mode].engine} {plan.describe()}" for mode, plan in self.plans.items()}

    @classmethod
    def load(cls, options: RuntimeOptions) -> EnsembleRuntime:
        """Verifies the model directory, opens every session on ONNX Runtime, moves the modes that ENGINE lets run on
        OpenVINO to it, and warms each mode up; StartupError if any fails."""
        root = options.model_dir
        manifest = usable_manifest(root)
        modes = served_modes(manifest)
        plans = thread_plans(options, len(manifest.members), modes)
        graph_tensors = (*manifest.signature.inputs, *manifest.signature.outputs)
        member_tensors = (*manifest.signature.inputs, *(manifest.signature.output(n) for n in manifest.member_outputs))

        slots = options.inference_slots
        shared = all(plan.intra_op_threads == 1 for plan in plans.values())

        def mode_set(mode: Mode, engine: Engine) -> SessionSet:
            """`mode`'s sessions on `engine`, as a set of their own; their pool threads are the threads that appear
            while they open."""
            file = MODES[mode].graph_file(manifest)  # None: a member mode (served_modes has no missing graph)
            graph = file is not None
            paths = [root / file.path] if graph else [root / m.file.path for m in manifest.members]
            tensors = graph_tensors if graph else member_tensors
            if engine is Engine.OPENVINO:  # a shared set's sessions run for every slot at once
                threads, callers = plans[mode].intra_op_threads, slots if shared else 1
                sessions, pools = new_threads(lambda: [open_openvino(path, threads, callers) for path in paths])
            else:
                sessions, pools = new_threads(lambda: [_open(path, plans[mode], tensors) for path in paths])
            return SessionSet({mode: sessions[0]} if graph else {}, {} if graph else {mode: sessions}, {mode: pools})

        def session_set() -> SessionSet:
            every = SessionSet({}, {}, {})
            for mode in modes:
                every.adopt(mode, mode_set(mode, Engine.ONNXRUNTIME))
            return every

        missing = None if options.engine is Engine.ONNXRUNTIME else openvino_missing()
        if missing is not None and options.engine is Engine.OPENVINO:
            raise StartupError(f"ENGINE=openvino: {missing}")
        onnxruntime = EngineChoice(Engine.ONNXRUNTIME, f"ENGINE={options.engine}" + (f": {missing}" if missing else ""))
        sets = [session_set() for _ in range(1 if shared else slots)]
        runtime = cls(manifest, sets, plans, slots, dict.fromkeys(modes, onnxruntime))
        if options.engine is not Engine.ONNXRUNTIME and missing is None:
            for mode in modes:
                runtime._move_to_openvino(mode, options.engine, partial(mode_set, mode, Engine.OPENVINO))
        runtime.warm_up()
        return runtime

    def _move_to_openvino(self, mode: Mode, engine: Engine, open_mode: Callable[[], SessionSet]) -> None:
        """Runs `mode` on OpenVINO if its outputs on the example input equal ONNX Runtime's within the manifest's
        tolerance and, with ENGINE=auto, it was faster; records the engine and why."""
        feeds, first = self.manifest.example_inputs(), self.session_sets[0]
        try:
            candidate = open_mode()
            got, _ = self._run(candidate, feeds, mode)
        except Exception as exc:  # StartupError from compiling, or OpenVINO's RuntimeError from running
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            self.engines[mode] = EngineChoice(Engine.ONNXRUNTIME, f"openvino failed: {first_line}")
            return
        worst, differs = disagreement(got, self._run(first, feeds, mode)[0], self.manifest.tolerance)
        if differs is not None:
            self.engines[mode] = EngineChoice(Engine.ONNXRUNTIME, f"openvino refused: {differs}")
            return
        agrees = f"outputs within {worst:.1e} of onnxruntime's"
        if engine is Engine.AUTO:
            ratio, runs = self._time_ratio(mode, first, candidate, feeds)
            timed = f"openvino took {ratio:.2f} of onnxruntime's time (medians of {runs} runs each, taking turns)"
            if ratio >= 1:
                self.engines[mode] = EngineChoice(Engine.ONNXRUNTIME, f"ENGINE={engine}: {timed}; {agrees}")
                return
            agrees = f"{timed}; {agrees}"
        for index, sessions in enumerate(self.session_sets):
            sessions.adopt(mode, candidate if index == 0 else open_mode())
        self.engines[mode] = EngineChoice(Engine.OPENVINO, f"ENGINE={engine}: {agrees}")

    def _time_ratio(
        self, mode: Mode, reference: SessionSet, candidate: SessionSet, feeds: Mapping[str, np.ndarray]
    ) -> tuple[float, int]:
        """The candidate's median time per run of `mode` over the reference's, and the runs each made: turn by turn
        (so that a slow spell of the machine hits both), for ENGINE_TRIAL_S or ENGINE_TRIAL_RUNS."""
        times: tuple[list[float], list[float]] = ([], [])
        least, most = ENGINE_TRIAL_RUNS
        deadline = time.perf_counter() + ENGINE_TRIAL_S
        while len(times[0]) < least or (len(times[0]) < most and time.perf_counter() < deadline):
            for sessions, seconds in zip((reference, candidate), times, strict=True):
                start = time.perf_counter()
                self._run(sessions, feeds, mode)
                seconds.append(time.perf_counter() - start)
        return statistics.median(times[1]) / statistics.median(times[0]), len(times[0])

    def infer(self, feeds: Mapping[str, np.ndarray], mode: Mode) -> Tensors:
        """Every output of the fused graph, by name, computed in `mode` (what the benchmarks and auto's windows
        time: no CPU accounting, whose counter reads would weigh on small models)."""
        with self._session_set() as sessions:
            return self._run(sessions, feeds, mode)[0]

    def infer_measured(self, feeds: Mapping[str, np.ndarray], mode: Mode) -> Measured:
        """`infer`, with the CPU seconds it cost: the calling thread's, the member threads' (parallel) and the
        session set's pools'. What the service runs for each request."""
        with self._session_set() as sessions:
            start = time.perf_counter()
            (outputs, member_threads_s), caller_s = timed_cpu(lambda: self._run(sessions, feeds, mode))
            seconds = time.perf_counter() - start
            cpu_s = caller_s + member_threads_s + sessions.charge_pool_cpu(mode)
            return Measured(outputs, Timing(inference_s=seconds, cpu_s=cpu_s))

    @contextmanager
    def _session_set(self) -> Iterator[SessionSet]:
        """A free slot's sessions for the length of the block."""
        if not self.session_sets:
            raise RuntimeError("the runtime is closed")
        sessions = self._free.get()
        try:
            yield sessions
        finally:
            self._free.put(sessions)

    def _run(self, sessions: SessionSet, feeds: Mapping[str, np.ndarray], mode: Mode) -> tuple[Tensors, float]:
        """The outputs, and the CPU seconds spent in member threads (parallel mode; otherwise the caller's)."""
        if mode in sessions.graphs:
            names = list(self.manifest.signature.output_names)
            return dict(zip(names, sessions.graphs[mode].run(names, feeds), strict=True)), 0.0
        names = list(self.manifest.member_outputs)

        def run(session: Session) -> tuple[Tensors, float]:
            return timed_cpu(lambda: dict(zip(names, session.run(names, feeds), strict=True)))

        concurrent = MODES[mode].concurrent_members
        results = list((self._member_pool.map if concurrent else map)(run, sessions.members[mode]))
        combined = combine([outputs for outputs, _ in results], self.manifest.combine, self.manifest.weights)
        return combined, sum(cpu for _, cpu in results) if concurrent else 0.0

    def warm_up(self) -> None:
        """Runs each mode on each session set once, so the first request does not pay for allocations and thread
        start-up, and checks that each gives the manifest's outputs."""
        feeds = self.manifest.example_inputs()
        for sessions in self.session_sets:
            for mode in self.modes:
                outputs, _ = self._run(sessions, feeds, mode)
                for spec in self.manifest.signature.outputs:
                    actual = outputs[spec.name]
                    if not spec.fits(actual.shape) or actual.dtype != spec.dtype:
                        raise StartupError(
                            f"{mode} mode returned {spec.name} as {actual.dtype} {list(actual.shape)}, the manifest "
                            f"says {spec.describe()}: rebuild the model directory"
                        )
        for sessions in self.session_sets:  # the warm-up's pool time is no request's
            for mode in self.modes:
                sessions.charge_pool_cpu(mode)
        self.typical_inference_s = statistics.median(
            self.infer_measured(feeds, mode).timing.inference_s for mode in self.modes
        )
        self.unbatchable = self._why_rows_cannot_stack()

    def _why_rows_cannot_stack(self) -> str | None:
        """Why requests must not run as one inference, their rows stacked, or None: a batch dimension the signature
        fixes, or, run on two rows together and on each alone, a mode whose outputs do not come one row per input
        row, or whose rows differ (rows that depend on each other, as a quantisation scale computed over the whole
        batch makes them)."""
        fixed = [t.name for t in (*self.manifest.signature.inputs, *self.manifest.signature.outputs) if not t.batched]
        if fixed:
            return f"the batch dimension of {', '.join(fixed)} is fixed"
        feeds = self.manifest.example_inputs(2, seed=1)
        for mode in self.modes:
            together = self.infer(feeds, mode)
            for row in range(2):
                alone = self.infer({name: array[row : row + 1] for name, array in feeds.items()}, mode)
                for name, expected in alone.items():
                    if together[name].shape[0] != 2 or expected.shape[0] != 1:
                        return f"in {mode} mode, output {name} does not have one row per input row"
                    if not _same_rows(together[name][row : row + 1], expected):
                        return f"in {mode} mode, the rows of {name} depend on the other rows of the batch"
        return None

    def close(self) -> None:
        """Lets the sessions go (their memory is freed once nothing else holds them). Only once no call is running:
        the data plane closes a model after its last request."""
        self._member_pool.shutdown(wait=False, cancel_futures=True)
        self.session_sets = ()
        self._free = queue.SimpleQueue()


def _open(path: Path, plan: ThreadPlan, tensors: Sequence[TensorSpec | None]) -> ort.InferenceSession:
    share_one_arena()
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


def _same_rows(batched: np.ndarray, alone: np.ndarray) -> bool:
    """Floats within ROW_TOLERANCE of the output's scale; anything else exactly."""
    if alone.dtype.kind not in "fc":
        return np.array_equal(batched, alone)
    scale = float(np.nanmax(np.abs(alone), initial=0))
    return bool(np.allclose(batched, alone, rtol=ROW_TOLERANCE, atol=ROW_TOLERANCE * scale, equal_nan=True))


def _compatible(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """Dynamic dimensions on either side fit anything; static ones must match."""
    return len(actual) == len(expected) and all(a == e or -1 in (a, e) for a, e in zip(actual, expected, strict=True))
