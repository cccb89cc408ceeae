"""The core every front calls (the REST routes and the gRPC servicer are translators over it, as MLServer's are
over its DataPlane): which model a request is served by, from its arrival to its end; the drain; and the one way
every inference runs, whatever its front: the request's checks against the model and the memory it will hold, its
admission, its inputs, the inference in the mode chosen, the front's answer made of its outputs, and the outcome
and timing recorded. Tensors in, tensors out: what a front makes of them (an image decoded, a mask drawn, the
outputs asked for) is the front's FrontRequest, called in its place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Generic, Literal, Protocol, TypeVar

from app.core.admission import Admission
from app.core.memory import REQUEST_BASE_BYTES, Lease, MemoryBudget, default_budget_bytes
from app.core.model import LoadedModel
from app.core.scheduler import Scheduler
from app.engine.priority import lower_thread_priority
from app.engine.runtime import Measured, Tensors
from app.engine.timing import Timing
from app.errors import InferenceFailed, InferenceTimeout, ModelNotFound, NotReady, Overloaded, ServiceError
from app.observability.metrics import ServiceMetrics, model_info
from app.settings import Settings
from app.workers import WorkerGroup
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode, ModeChoice

T = TypeVar("T")
A = TypeVar("A", covariant=True)
Front = Literal["http", "grpc"]


class FrontRequest(Protocol[A]):
    """A front's request as the data plane runs it (DataPlane.infer calls each step in its place): one object per
    request, which may keep what a step finds for the next."""

    @property
    def model_name(self) -> str | None: ...  # None: the model served, whichever it is

    @property
    def mode(self) -> ModeChoice | None: ...

    async def check(self, model: LoadedModel, lease: Lease) -> int:
        """Checks it against `model` and reserves on `lease` what it will hold, before it is admitted (a refusal
        here is no prediction's): its rows."""
        ...

    async def feeds(self, model: LoadedModel, lease: Lease) -> tuple[Tensors, float]:
        """Its inputs, once admitted, and the CPU seconds making them took then."""
        ...

    async def answer(self, model: LoadedModel, mode: Mode, outputs: Tensors, lease: Lease) -> tuple[A, float]:
        """What the front makes of the outputs (its own rows) `mode` computed, and the CPU seconds that took."""
        ...


@dataclass(frozen=True)
class Inferred(Generic[A]):
    """An inference as the data plane hands it back: the model that answered, the mode that ran, the front's answer
    and where the time went."""

    manifest: Manifest
    mode: Mode
    answer: A
    timing: Timing


class DataPlane:
    """Serves one model at a time (`model`, which a reload switches, publishing this worker's status); admission
    control, the scheduler, the memory budget, the conversion threads and the draining state are the server's and
    outlive a switch."""

    def __init__(self, settings: Settings, model: LoadedModel, metrics: ServiceMetrics, workers: WorkerGroup) -> None:
        self.settings = settings
        self.metrics = metrics
        self.workers = workers
        self.model: LoadedModel | None = None
        # A reload keeps the layout, so the slots stay the number the first model was loaded with.
        self.scheduler = Scheduler(
            model.runtime.slots,
            lambda mode, rows: metrics.batch_rows.labels(mode).observe(rows),
            settings.inline_inference_ms / 1000,
        )
        self.admission = Admission(
            self.scheduler, settings.max_queue, settings.max_queue_wait_ms / 1000, metrics.inferences_admitted.set
        )
        budget = settings.memory_budget_bytes or default_budget_bytes(model.cost.largest_working_bytes, workers.count)
        self.memory = MemoryBudget(
            budget, settings.max_request_bytes, metrics.memory_reserved.set, base_bytes=REQUEST_BASE_BYTES
        )
        metrics.memory_budget.set(self.memory.total_bytes)
        metrics.describe_machine(settings)
        self.switch(model)
        # The fronts' conversions (decoding an image, drawing a mask) run off the event loop, a few at a time (they
        # are CPU-bound too).
        self._conversions = ThreadPoolExecutor(
            workers.cores.share, thread_name_prefix="convert", initializer=lower_thread_priority
        )
        self.ready = True
        self._draining_since: float | None = None

    def switch(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serves `model` from the next request on (None: none, after an unload) and retires the one it replaces,
        whose sessions close when its last request is done, and publishes what this worker serves. Returns the
        replaced model."""
        replaced, self.model = self.model, model
        if model is not None:
            self.scheduler.assume_run_s(model.runtime.typical_inference_s)  # the warm-up's, until runs measure it
            self.metrics.describe_model(model.runtime, model.auto.flags() if model.auto else {})
            self.workers.publish(model.manifest.name, model.sha256, model_info(model.runtime))
        else:
            self.workers.publish()
        if replaced is not None:
            replaced.retire()
        return replaced

    @contextmanager
    def using(self, arrived: float | None = None, name: str | None = None) -> Iterator[LoadedModel]:
        """The model that serves a request which arrived at `arrived` (time.perf_counter(); default: now), from now
        to the end of the block, even if a reload switches models meanwhile. NotReady if the server is draining
        (for requests that arrived since) or no model is loaded; ModelNotFound if the request names another model."""
        if not self.serves(time.perf_counter() if arrived is None else arrived):
            raise NotReady("the server is shutting down")
        model = self.model
        if model is None:
            raise NotReady("no model is loaded: load one with POST /v2/repository/models/{name}/load")
        if name is not None and name != model.manifest.name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {model.manifest.name!r}")
        model.in_flight += 1
        try:
            yield model
        finally:
            model.release()

    def server_ready(self, arrived: float) -> bool:
        """Whether a model is served; NotReady for a request that arrived while the server drains."""
        if not self.serves(arrived):
            raise NotReady("the server is shutting down")
        return self.model is not None

    def model_ready(self, name: str, arrived: float) -> bool:
        """Whether a request for `name` arriving now is served: the answer `using` gives (REST renders its errors,
        404 and 503, as the protocol's "not ready"; gRPC answers this flag)."""
        try:
            with self.using(arrived, name):
                return True
        except (ModelNotFound, NotReady):
            return False

    def manifest(self, name: str, arrived: float) -> Manifest:
        """The manifest of the model served as `name` (its metadata)."""
        with self.using(arrived, name) as model:
            return model.manifest

    async def infer(self, request: FrontRequest[A], *, arrived: float, front: Front, lease: Lease) -> Inferred[A]:
        """Every front's inference: the model that serves it; the request's checks and the memory it holds (on
        `lease`) before it is admitted; once admitted, its inputs and its inference; the front's answer made of its
        outputs; its outcome counted and, once it succeeded, its timing recorded."""
        with self.using(arrived, request.model_name) as model:
            rows = await request.check(model, lease)
            mode = model.selector.pick(request.mode)
            with self._outcome(mode, front):
                with self.admission.ticket(rows):
                    feeds, feeds_cpu_s = await request.feeds(model, lease)
                    measured = await self._run(model, feeds, mode)
                answer, answer_cpu_s = await request.answer(model, mode, measured.outputs, lease)
            cpu_s = feeds_cpu_s + measured.timing.cpu_s + answer_cpu_s
            timing = replace(measured.timing, cpu_s=cpu_s, request_s=time.perf_counter() - arrived)
            self.metrics.observe(mode, front, timing)
            model.recent.record(mode, timing)
            return Inferred(model.manifest, mode, answer, timing)

    async def off_loop(self, function: Callable[..., T], *args: object) -> T:
        """A front's CPU-bound conversion, run on the conversion threads."""
        return await asyncio.get_running_loop().run_in_executor(self._conversions, function, *args)

    async def _run(self, model: LoadedModel, feeds: Tensors, mode: Mode) -> Measured:
        try:
            return await self.scheduler.run(model.batchable(mode, feeds), self.settings.request_timeout_s)
        except ServiceError:
            raise
        except Exception as exc:  # ONNX Runtime's own error types: a 500 naming the request id, cause in the log
            raise InferenceFailed(f"the {mode} inference failed") from exc

    @contextmanager
    def _outcome(self, mode: Mode, front: Front) -> Iterator[None]:
        """Counts a failed prediction by why it failed; `infer` counts the successes with their timing."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, Overloaded | InferenceTimeout):
                outcome = exc.code
            elif isinstance(exc, ServiceError) and exc.status < 500:
                outcome = "bad_input"
            else:
                outcome = "error"
            self.metrics.predictions.labels(mode, front, outcome).inc()
            raise

    def drain(self) -> None:
        """The server is stopping: readiness turns false and requests that arrive from now on are refused with
        503, while the ones already in flight (even if their body is still uploading) finish."""
        self.ready = False
        self._draining_since = time.perf_counter()

    def serves(self, arrived: float) -> bool:
        """Whether a request that arrived at `arrived` (time.perf_counter()) is served."""
        return self.ready or (self._draining_since is not None and arrived < self._draining_since)

    def close(self) -> None:
        self.ready = False
        self._conversions.shutdown(wait=False, cancel_futures=True)
        self.scheduler.close()
        self.switch(None)
