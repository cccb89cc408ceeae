"""One loaded model: its sessions, the mode choice over them, and its recent latencies.

A request takes the model served when it starts and keeps it to the end (`DataPlane.using`), so a reload that
switches models in between never mixes two models in one request; the replaced model's sessions are freed when
its last request finishes.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from app.core.auto import AutoChoice, SlotLayout, choose_once
from app.core.cost import CostModel
from app.core.scheduler import Batchable, BatchingPolicy
from app.engine.priority import lower_thread_priority
from app.engine.probe import working_bytes_per_element
from app.engine.resources import CoreCount, usable_cores
from app.engine.runtime import EnsembleRuntime, RuntimeOptions, Tensors
from app.engine.selector import ModeSelector
from app.errors import NotAnImageModel, StartupError
from app.observability.stats import RecentLatencies
from app.settings import Engine, Settings
from app.workers import WorkerGroup
from ensemble_contract.manifest import ImageSpec, Manifest
from ensemble_contract.modes import AUTO, Mode

logger = logging.getLogger("app")


@dataclass
class LoadedModel:
    directory: Path  # MODEL_DIR as it resolved when the model was loaded (an operator may switch a symlink)
    runtime: EnsembleRuntime
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
        infer = partial(self.runtime.infer_measured, mode=mode)
        return Batchable((id(self), mode, shapes), mode, rows, self.batching, feeds, infer)

    def members_output(self, output: str) -> str | None:
        """The output stacking each member's `output`, when the fused graph has one."""
        return next((c.members_output for c in self.manifest.combine if c.output == output), None)

    def release(self) -> None:
        """One request is done with it; the last one out of a retired model closes its sessions."""
        self.in_flight -= 1
        if self.retired and self.in_flight == 0:
            self.runtime.close()

    def retire(self) -> None:
        self.retired = True
        if self.in_flight == 0:
            self.runtime.close()


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
        engine=settings.engine or (Engine.AUTO if settings.default_mode == AUTO else Engine.ONNXRUNTIME),
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
    selector = ModeSelector(settings.default_mode, runtime.modes, auto.mode if auto else None)
    recent = RecentLatencies(settings.stats_window_s, runtime.modes, workers)
    try:
        working = working_bytes_per_element(directory)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        runtime.close()
        raise StartupError(str(exc)) from None
    elements_per_row = sum(array.size for array in runtime.manifest.example_inputs(1).values())
    cost = CostModel(runtime.manifest.signature, settings.max_batch_rows, working, elements_per_row)
    allowed = BatchingPolicy.allowed(settings, runtime.unbatchable)
    batching = allowed.at_most(auto.batching_rows) if auto else allowed
    return LoadedModel(directory, runtime, auto, selector, recent, cost, batching)


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
        "; ".join(f"{mode} {plan.describe()}" for mode, plan in runtime.plans.items()),
    )
    for mode, choice in runtime.engines.items():
        logger.info("engine of %s mode: %s (%s)", mode, choice.engine, choice.reason)
