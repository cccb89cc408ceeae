"""The core every front calls (the REST routes and the gRPC servicer are translators over it, as MLServer's are
over its DataPlane): which model a request is served by, from its arrival to its end; the drain; the checks of a
request against the model (its name, its tensors against the signature, its image against the image spec); its
memory and its admission; the inference in the mode chosen; the outputs asked for; and the measurements.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field

from app.core import imaging
from app.core.admission import Admission
from app.core.cost import USE_BINARY, decode_bytes, encoded_bytes
from app.core.memory import REQUEST_BASE_BYTES, Lease, MemoryBudget, default_budget_bytes
from app.core.model import LoadedModel
from app.core.tensors import TensorRequest, asked_outputs, input_arrays, input_specs
from app.engine.cpu import timed_cpu
from app.engine.priority import lower_thread_priority
from app.engine.runtime import Tensors
from app.errors import InferenceFailed, InferenceTimeout, ModelNotFound, NotReady, Overloaded, ServiceError
from app.observability.metrics import ServiceMetrics, model_info
from app.settings import Settings
from app.workers import WorkerGroup
from ensemble_contract.manifest import ImageSpec, Manifest
from ensemble_contract.modes import Mode, ModeChoice

T = TypeVar("T")
Front = Literal["http", "grpc"]


class Timings(BaseModel):
    """Where a prediction's time went, in milliseconds (the answer's `timings_ms`, its Server-Timing header)."""

    decode: float
    preprocess: float
    queue: float = Field(description="Waiting for an inference slot, and for the requests batched with it.")
    batch_wait: float = Field(
        description="The part of the queue spent gathering its batch once a slot was free (BATCHING_DELAY_MS)."
    )
    inference: float
    total: float = Field(description="From the start of decoding to the result.")
    cpu: float = Field(description="CPU time of every thread that served it (decode, inference, pools).")
    batch_size: int = Field(description="Not a time: the rows of the inference it ran in, its own included.")


@dataclass(frozen=True)
class Inference:
    """A request's outputs, the mode that computed them, and how long it took."""

    mode: Mode
    outputs: Tensors  # its own rows
    queue_s: float
    batch_wait_s: float
    batch_rows: int  # of the inference it ran in
    inference_s: float
    cpu_s: float  # its share (by rows) of the inference's, all threads


@dataclass(frozen=True)
class ImagePrediction:
    manifest: Manifest  # of the model that answered
    image: ImageSpec
    mode: Mode
    probabilities: np.ndarray | None  # [labels], when the model scores labels
    member_probabilities: np.ndarray | None  # [M, labels], when the fused graph gives each member's scores
    mask_png: bytes | None  # palette PNG of the mask output's argmax, at model resolution
    timings: Timings


@dataclass(frozen=True)
class TensorResult:
    model_name: str
    mode: Mode
    outputs: dict[str, np.ndarray]  # the outputs asked for, in the order asked
    binary: dict[str, bool]  # whether each goes as binary data
    batch_rows: int  # of the inference it ran in


class DataPlane:
    """Serves one model at a time (`model`, which a reload switches, publishing this worker's status); admission
    control, the memory budget, the image threads and the draining state are the server's and outlive a switch."""

    def __init__(self, settings: Settings, model: LoadedModel, metrics: ServiceMetrics, workers: WorkerGroup) -> None:
        self.settings = settings
        self.metrics = metrics
        self.workers = workers
        self.model: LoadedModel | None = None
        # A reload keeps the layout, so the slots stay the number the first model was loaded with.
        self.admission = Admission(
            model.runtime.slots,
            settings.max_queue,
            settings.max_queue_wait_ms / 1000,
            settings.batching_delay_ms / 1000,
            lambda mode, rows: metrics.batch_size.labels(mode).observe(rows),
            metrics.inferences_admitted.set,
        )
        budget = settings.memory_budget_bytes or default_budget_bytes(model.cost.largest_working_bytes, workers.count)
        self.memory = MemoryBudget(
            budget, settings.max_request_bytes, metrics.memory_reserved.set, base_bytes=REQUEST_BASE_BYTES
        )
        metrics.memory_budget.set(self.memory.total_bytes)
        metrics.describe_machine(settings.cost_per_hour)
        self.switch(model)
        # Decoding and mask encoding run off the event loop, a few at a time (they are CPU-bound too).
        self._image_pool = ThreadPoolExecutor(
            workers.cores.share, thread_name_prefix="image", initializer=lower_thread_priority
        )
        self.ready = True
        self._draining_since: float | None = None

    def switch(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serves `model` from the next request on (None: none, after an unload) and retires the one it replaces,
        whose sessions close when its last request is done, and publishes what this worker serves. Returns the
        replaced model."""
        replaced, self.model = self.model, model
        if model is not None:
            self.admission.service_s = model.runtime.typical_inference_s  # the warm-up's, until requests measure it
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

    async def predict_image(
        self,
        read: Callable[[], Awaitable[bytes]],
        *,
        mode: ModeChoice | None,
        with_mask: bool,
        arrived: float,
        lease: Lease,
    ) -> ImagePrediction:
        """One encoded image, read by `read` once the model is known to take images (NotAnImageModel before any
        byte is read otherwise), to label probabilities (and a mask). Decoding and the inference reserve their
        memory on `lease` before they run."""
        with self.using(arrived) as model:
            image = model.image_spec()
            data = await read()
            chosen = model.selector.pick(mode)
            with self._outcome(chosen, "http"), self.admission.ticket():
                start = time.perf_counter()
                (batch, decode_s, preprocess_s), decode_cpu_s = await self._off_loop(
                    timed_cpu, partial(self._decode_and_preprocess, model, image, data, lease)
                )
                self.metrics.decode_seconds.observe(decode_s)
                self.metrics.preprocess_seconds.observe(preprocess_s)
                inference = await self._infer(model, batch, chosen)
            mask_png, mask_cpu_s = None, 0.0
            if with_mask and image.mask_output is not None:
                mask = inference.outputs[image.mask_output][0]
                mask_png, mask_cpu_s = await self._off_loop(timed_cpu, partial(_mask_png, image.mask_classes, mask))
            cpu_s = decode_cpu_s + inference.cpu_s + mask_cpu_s
            self._record(model, inference, arrived, cpu_s, "http")
            scores, member_scores = None, None
            if image.scores_output is not None:
                if not np.isfinite(inference.outputs[image.scores_output]).all():
                    raise InferenceFailed(f"the {chosen} inference returned scores that are not finite")
                scores = image.probabilities(inference.outputs[image.scores_output][0])
                stacked = model.members_output(image.scores_output)
                member_scores = image.probabilities(inference.outputs[stacked][0]) if stacked else None
            timings = Timings(
                decode=decode_s * 1000,
                preprocess=preprocess_s * 1000,
                queue=inference.queue_s * 1000,
                batch_wait=inference.batch_wait_s * 1000,
                inference=inference.inference_s * 1000,
                total=(time.perf_counter() - start) * 1000,
                cpu=cpu_s * 1000,
                batch_size=inference.batch_rows,
            )
            return ImagePrediction(model.manifest, image, chosen, scores, member_scores, mask_png, timings)

    async def infer_tensors(
        self, request: TensorRequest, *, arrived: float, front: Front, lease: Lease
    ) -> TensorResult:
        """A tensor request, checked against the model's signature, to the outputs it asks for. Before any of its
        data is converted, its header reserves on `lease` what the rest of it will hold (413 past MAX_BATCH_ROWS
        or MAX_REQUEST_BYTES, 503 past the memory budget); outputs whose dimensions the signature leaves open,
        reserved as one element each, reserve what they really hold once computed."""
        with self.using(arrived, request.model_name) as model:
            signature = model.manifest.signature
            outputs = asked_outputs(request, signature)
            specs = input_specs(request, signature)
            advice = "" if all(outputs.values()) else USE_BINARY
            decoding = sum(tensor.payload.decoding_bytes for tensor in request.inputs)
            needed = model.cost.request_bytes(request.shapes, outputs) + decoding
            lease.reserve(needed, "its tensors, their inference and its outputs", advice=advice)
            feeds = input_arrays(request, specs)
            chosen = model.selector.pick(request.mode)
            with self._outcome(chosen, front), self.admission.ticket(model.cost.rows(request.shapes)):
                inference = await self._infer(model, feeds, chosen)
                sizes = {name: (inference.outputs[name].size, inference.outputs[name].itemsize) for name in outputs}
                foreseen = model.cost.output_bytes(model.cost.rows(request.shapes), outputs)
                unforeseen = encoded_bytes(sizes, outputs) - foreseen
                lease.reserve(unforeseen, "its outputs, larger than the signature says", advice=advice)
            self._record(model, inference, arrived, inference.cpu_s, front)
            asked = {name: inference.outputs[name] for name in outputs}
            return TensorResult(model.manifest.name, chosen, asked, outputs, inference.batch_rows)

    async def _infer(self, model: LoadedModel, feeds: Tensors, mode: Mode) -> Inference:
        try:
            admitted = await self.admission.run(model.batchable(mode, feeds), self.settings.request_timeout_s)
        except ServiceError:
            raise
        except Exception as exc:  # ONNX Runtime's own error types: a 500 naming the request id, cause in the log
            raise InferenceFailed(f"the {mode} inference failed") from exc
        measured = admitted.value
        return Inference(
            mode,
            measured.outputs,
            admitted.waited_s,
            admitted.batch_wait_s,
            admitted.batch_rows,
            measured.seconds,
            measured.cpu_s,
        )

    @contextmanager
    def _outcome(self, mode: Mode, front: Front) -> Iterator[None]:
        """Counts a failed prediction by why it failed; successes are counted by _record."""
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

    def _record(self, model: LoadedModel, inference: Inference, arrived: float, cpu_s: float, front: Front) -> None:
        mode, request_s = inference.mode, time.perf_counter() - arrived
        self.metrics.cpu_seconds.labels(mode).observe(cpu_s)
        self.metrics.predictions.labels(mode, front, "ok").inc()
        self.metrics.slot_wait_seconds.labels(mode).observe(inference.queue_s)
        self.metrics.inference_seconds.labels(mode).observe(inference.inference_s)
        self.metrics.request_seconds.labels(mode, front).observe(request_s)
        model.recent.record(
            mode,
            request_s=request_s,
            queue_s=inference.queue_s,
            inference_s=inference.inference_s,
            cpu_s=cpu_s,
            batch_rows=inference.batch_rows,
        )

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
        self._image_pool.shutdown(wait=False, cancel_futures=True)
        self.admission.close()
        self.switch(None)

    async def _off_loop(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._image_pool, function, *args)

    def _decode_and_preprocess(
        self, model: LoadedModel, image: ImageSpec, data: bytes, lease: Lease
    ) -> tuple[Tensors, float, float]:
        start = time.perf_counter()
        max_pixels = self.settings.image_pixel_limit(image.width, image.height)
        opened = imaging.open_image(data, max_pixels=max_pixels, target_size=(image.width, image.height))
        lease.reserve(decode_bytes(*opened.size), "the decoded image")
        every_output = dict.fromkeys(model.manifest.signature.output_names, True)
        lease.reserve(model.cost.request_bytes({image.input: (1, *image.shape)}, every_output), "its inference")
        decoded_image = imaging.decode(opened)
        decoded = time.perf_counter()
        input_spec = model.manifest.signature.input(image.input)
        assert input_spec is not None  # the manifest's validator checks it
        batch = imaging.preprocess(decoded_image, image, input_spec.dtype)
        return {image.input: batch}, decoded - start, time.perf_counter() - decoded


def _mask_png(classes: Sequence[str], mask_scores: np.ndarray) -> bytes:
    """mask_scores: [classes, H, W] of one image."""
    return imaging.encode_mask_png(mask_scores.argmax(axis=0).astype(np.uint8), len(classes))
