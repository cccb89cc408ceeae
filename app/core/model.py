"""One loaded model: its sessions, the mode choice over them, and its recent latencies.

A request takes the model served when it starts and keeps it to the end (`DataPlane.using`), so a reload that
switches models in between never mixes two models in one request; the replaced model's sessions are freed when
its last request finishes.

Light traffic and heavy traffic want different sessions: a lone request runs fastest on every core, many at once
run fastest side by side, each on its worker's and slot's share. A model keeps both where they differ
(ALONE_ON_EVERY_CORE): each inference, as it starts, asks the worker group's load (app.workers.GroupLoad) whether
it is the only one running, and runs on the sessions for every core if so. The choice is made per inference, from
what runs at that instant, so it follows the load as it changes: no restart, no request refused.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from pydantic import BaseModel, Field

from app.core.auto import AutoChoice, SlotLayout, choose_once
from app.core.cost import CostModel
from app.core.scheduler import Batchable, BatchingPolicy
from app.engine.priority import lower_thread_priority
from app.engine.probe import working_bytes_per_element
from app.engine.resources import CoreCount, usable_cores
from app.engine.runtime import EnsembleRuntime, Measured, RuntimeOptions, Tensors, thread_plans
from app.engine.selector import ModeSelector
from app.errors import NotAnImageModel, StartupError
from app.observability.stats import RecentLatencies
from app.settings import Settings
from app.workers import GroupLoad, LoadCell, WorkerGroup
from ensemble_contract.manifest import ImageSpec, Manifest
from ensemble_contract.modes import AUTO, Mode

logger = logging.getLogger("app")


class SessionsNow(BaseModel):
    """Which sessions inferences run on, why, and how many ran on each (/readyz, /stats)."""

    alone_on_every_core: bool = Field(description="Whether an inference running alone in the group gets every core.")
    why: str
    shared: dict[Mode, str] = Field(
        description="Each mode's engine and session options beside other inferences (the layout's)."
    )
    alone: dict[Mode, str] | None = Field(description="Each mode's engine and session options alone, if they differ.")
    running_now: int = Field(description="Inferences running in the worker group now.")
    runs_alone: int = Field(description="Inferences that ran alone in the group, every worker, since it started.")
    runs_shared: int = Field(description="Inferences that ran beside others.")


@dataclass
class LoadedModel:
    directory: Path  # MODEL_DIR as it resolved when the model was loaded (an operator may switch a symlink)
    runtime: EnsembleRuntime  # sessions on this worker's share of the cores, in its slots' layout
    alone: EnsembleRuntime | None  # one slot's sessions on every core, for an inference running alone in the group
    load: GroupLoad
    auto: AutoChoice | None
    selector: ModeSelector
    recent: RecentLatencies
    cost: CostModel
    batching: BatchingPolicy
    in_flight: int = 0  # requests using it (counted on the event loop)
    retired: bool = field(default=False)  # replaced or unloaded: closed once in_flight is back to 0

    @property
    def manifest(self) -> Manifest:
        return self.runtime.manifest

    @property
    def sha256(self) -> str:
        return self.manifest.ensemble.sha256

    def image_spec(self) -> ImageSpec:
        """How /predict reads an image; NotAnImageModel when the model takes none."""
        manifest = self.manifest
        if manifest.image is None:
            inputs = ", ".join(t.describe() for t in manifest.signature.inputs)
            raise NotAnImageModel(
                f"model {manifest.name} takes tensors ({inputs}), not images: POST them to "
                f"/v2/models/{manifest.name}/infer"
            )
        return manifest.image

    def batchable(self, mode: Mode, feeds: Tensors) -> Batchable:
        """A request's inference: it may run as one with others of this model, in this mode, whose inputs agree with
        its own in all but the batch dimension (alone when the model does not batch)."""
        shapes = tuple((name, array.shape[1:], array.dtype.str) for name, array in sorted(feeds.items()))
        rows = next(iter(feeds.values())).shape[0]
        return Batchable((id(self), mode, shapes), mode, rows, self.batching, feeds, partial(self.infer, mode=mode))

    def infer(self, feeds: Tensors, mode: Mode) -> Measured:
        """Runs on every core when no other inference runs in the group, on this slot's share otherwise."""
        with self.load.running() as alone:
            runtime = self.alone if alone and self.alone is not None else self.runtime
            return runtime.infer_measured(feeds, mode)

    def sessions_now(self, settings: Settings, cores: CoreCount) -> SessionsNow:
        if self.alone is not None:
            why = (
                f"an inference that starts while no other runs in the worker group runs on all {cores.count} cores; "
                f"beside others, on its share: {cores.count} cores over {cores.workers} worker(s) of "
                f"{self.runtime.slots} inference slot(s)"
            )
        elif settings.alone_on_every_core:
            why = "the layout's sessions already run on every core"
        else:
            why = "ALONE_ON_EVERY_CORE=false: every inference runs on its worker's and slot's share"
        return SessionsNow(
            alone_on_every_core=self.alone is not None,
            why=why,
            shared=self.runtime.describe_sessions(),
            alone=self.alone.describe_sessions() if self.alone else None,
            running_now=self.load.running_now(),
            runs_alone=self.load.ran(LoadCell.ALONE),
            runs_shared=self.load.ran(LoadCell.SHARED),
        )

    def members_output(self, output: str) -> str | None:
        """The output stacking each member's `output`, when the fused graph has one."""
        return next((c.members_output for c in self.manifest.combine if c.output == output), None)

    def release(self) -> None:
        """One request is done with it; the last one out of a retired model closes its sessions."""
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.close()

    def retire(self) -> None:
        self.retired = True
        if self.in_flight == 0:
            self.close()

    def close(self) -> None:
        self.runtime.close()
        if self.alone is not None:
            self.alone.close()


def runtime_options(settings: Settings, cores: int | None = None) -> RuntimeOptions:
    """What the engine reads of the settings, MODEL_DIR resolved now (an operator may switch a symlink), sessions
    sized by `cores` (by default every usable core: a process serving alone)."""
    return RuntimeOptions(
        model_dir=settings.model_dir.resolve(),
        cores=usable_cores().count if cores is None else cores,
        inference_slots=settings.inference_slots,
        fused_intra_op_threads=settings.fused_intra_op_threads,
        sequential_intra_op_threads=settings.sequential_intra_op_threads,
        parallel_intra_op_threads=settings.parallel_intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.spinning,
        engine=settings.engine,
    )


def load_model(settings: Settings, workers: WorkerGroup, layout: SlotLayout | None = None) -> LoadedModel:
    """Verifies MODEL_DIR, opens and warms its sessions on this worker's share of the cores (StartupError saying
    why if any of it fails). With DEFAULT_MODE=auto the modes are timed (by one worker process), under every layout
    or, given one (a reload), under that one.
    Runs at the inference threads' priority: ONNX Runtime's pool threads, started here, inherit it."""
    lower_thread_priority()
    options = runtime_options(settings, workers.cores.share)
    directory = options.model_dir
    if settings.default_mode == AUTO:
        runtime, auto = choose_once(settings, options, workers, [layout] if layout else None)
    else:
        runtime, auto = EnsembleRuntime.load(options), None
    alone: EnsembleRuntime | None = None
    try:
        alone = sessions_alone(settings, options, runtime, workers)
        working = working_bytes_per_element(directory)
    except (StartupError, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        for opened in (runtime, alone):
            if opened is not None:
                opened.close()
        raise exc if isinstance(exc, StartupError) else StartupError(str(exc)) from None
    selector = ModeSelector(settings.default_mode, runtime.modes, auto.mode if auto else None)
    recent = RecentLatencies(settings.stats_window_s, runtime.modes, workers)
    elements_per_row = sum(array.size for array in runtime.manifest.example_inputs(1).values())
    cost = CostModel(runtime.manifest.signature, settings.max_batch_rows, working, elements_per_row)
    allowed = BatchingPolicy.allowed(settings, runtime.unbatchable)
    batching = allowed.at_most(auto.batching_rows) if auto else allowed
    return LoadedModel(directory, runtime, alone, workers.load, auto, selector, recent, cost, batching)


def sessions_alone(
    settings: Settings, options: RuntimeOptions, runtime: EnsembleRuntime, workers: WorkerGroup
) -> EnsembleRuntime | None:
    """The sessions of an inference running alone in the group: one slot's on every core the process may use, where
    `runtime`'s layout gives its sessions fewer threads (None there, or with ALONE_ON_EVERY_CORE=false)."""
    if not settings.alone_on_every_core:
        return None
    every_core = replace(options, cores=workers.cores.count, inference_slots=1)
    if thread_plans(every_core, len(runtime.manifest.members), runtime.modes) == runtime.plans:
        return None
    return EnsembleRuntime.load(every_core)


def log_model(model: LoadedModel, settings: Settings, cores: CoreCount) -> None:
    manifest, runtime, auto = model.manifest, model.runtime, model.auto
    if auto is not None:
        logger.info(
            "auto: %s in layout %s (slots x threads), batches of up to %d rows: %s",
            auto.mode,
            auto.layout,
            auto.batching_rows,
            auto.reason,
        )
    batching = model.batching
    if batching.off_because is not None:
        logger.info("batching off: %s", batching.off_because)
    elif batching.max_rows == 1:
        logger.info("batching off: %s", "auto measured no gain" if auto else "BATCHING_MAX_ROWS=1")
    else:
        logger.info("batching: requests waiting together run as one inference of up to %d rows", batching.max_rows)
    logger.info(
        "serving %s from %s (ensemble sha256 %s, members %s), default mode %s, cores %s, sessions: %s",
        manifest.name,
        model.directory,
        model.sha256[:12],
        ", ".join(member.name for member in manifest.members),
        settings.default_mode,
        cores.describe(),
        "; ".join(f"{mode} {sessions}" for mode, sessions in runtime.describe_sessions().items()),
    )
    for mode, choice in runtime.engines.items():
        logger.info("engine of %s mode: %s (%s)", mode, choice.engine, choice.reason)
    if model.alone is not None:
        logger.info(
            "an inference running alone in the worker group runs on every core: %s",
            "; ".join(f"{mode} {sessions}" for mode, sessions in model.alone.describe_sessions().items()),
        )
