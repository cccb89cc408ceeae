"""The core every protocol shares: admission, mode choice, preprocess -> infer -> postprocess, measurements.

The HTTP routers only translate between their wire format and the calls here (as MLServer's data plane).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal, TypeVar

import numpy as np

from app.core import imaging
from app.core.admission import Admission
from app.core.cost import USE_BINARY, decode_bytes, encoded_bytes
from app.core.memory import Lease, MemoryBudget, default_budget_bytes
from app.engine.cpu import timed_cpu
from app.engine.model import LoadedModel
from app.engine.priority import lower_thread_priority
from app.engine.resources import available_cores
from app.engine.runtime import Tensors
from app.errors import InferenceFailed, InferenceTimeout, NotReady, Overloaded, ServiceError
from app.observability.metrics import Metrics
from app.settings import Settings
from ensemble_contract.modes import Mode, ModeChoice

T = TypeVar("T")
Protocol = Literal["http", "grpc"]


@dataclass(frozen=True)
class Timings:
    decode_s: float
    preprocess_s: float
    queue_s: float
    inference_s: float
    total_s: float
    cpu_s: float  # every thread's CPU time for this prediction


@dataclass(frozen=True)
class Inference:
    """The outputs of one batch, the mode that computed them, and how long it took."""

    mode: Mode
    outputs: Tensors
    queue_s: float
    inference_s: float
    cpu_s: float  # the inference's, all threads


@dataclass(frozen=True)
class ImagePrediction:
    mode: Mode
    probabilities: np.ndarray | None  # [labels], when the model scores labels
    member_probabilities: np.ndarray | None  # [M, labels], when the fused graph gives each member's scores
    mask_png: bytes | None  # palette PNG of the mask output's argmax, at model resolution
    timings: Timings


class DataPlane:
    """Serves one model at a time (`model`, which a reload switches); admission control, the image threads and
    the draining state are the server's and outlive a switch."""

    def __init__(self, settings: Settings, model: LoadedModel, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: LoadedModel | None = None
        # A reload keeps the layout, so the slots stay the number the first model was loaded with.
        self.admission = Admission(model.runtime.slots, settings.max_queue, settings.max_queue_wait_ms / 1000)
        budget = settings.memory_budget_bytes or default_budget_bytes(model.cost.largest_working_bytes)
        self.memory = MemoryBudget(budget, settings.max_request_bytes)
        metrics.inferences_admitted.set_function(lambda: self.admission.admitted)
        metrics.memory_reserved.set_function(lambda: self.memory.held_bytes)
        metrics.memory_budget.set(self.memory.total_bytes)
        metrics.describe_machine(settings.cost_per_hour)
        self.switch(model)
        # Decoding and mask encoding run off the event loop, a few at a time (they are CPU-bound too).
        self._image_pool = ThreadPoolExecutor(
            available_cores(), thread_name_prefix="image", initializer=lower_thread_priority
        )
        self.ready = True
        self._draining_since: float | None = None

    def switch(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serves `model` from the next request on (None: none, after an unload) and retires the one it replaces,
        whose sessions close when its last request is done. Returns the replaced model."""
        replaced, self.model = self.model, model
        if model is not None:
            self.admission.service_s = model.runtime.typical_inference_s  # the warm-up's, until requests measure it
            self.metrics.describe_model(model.runtime, model.auto)
        if replaced is not None:
            replaced.retire()
        return replaced

    @contextmanager
    def using(self) -> Iterator[LoadedModel]:
        """The model served now, for the length of one request (NotReady when none is loaded)."""
        model = self.model
        if model is None:
            raise NotReady("no model is loaded: load one with POST /v2/repository/models/{name}/load")
        model.in_flight += 1
        try:
            yield model
        finally:
            model.release()

    async def predict_image(
        self,
        model: LoadedModel,
        data: bytes,
        *,
        mode: ModeChoice | None,
        with_mask: bool,
        arrived: float,
        lease: Lease,
    ) -> ImagePrediction:
        """One encoded image to label probabilities (and a mask). `arrived`: time.perf_counter() at arrival; `lease`:
        the request's memory, which decoding and the inference reserve before they run."""
        image = model.image_spec()
        chosen = model.selector.pick(mode)
        with self._outcome(chosen, "http"), self.admission.ticket():
            start = time.perf_counter()
            (batch, decode_s, preprocess_s), decode_cpu_s = await self._off_loop(
                timed_cpu, partial(self._decode_and_preprocess, model, data, lease)
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
        return ImagePrediction(
            chosen,
            scores,
            member_scores,
            mask_png,
            Timings(
                decode_s, preprocess_s, inference.queue_s, inference.inference_s, time.perf_counter() - start, cpu_s
            ),
        )

    @staticmethod
    def reserve_tensors(
        lease: Lease, model: LoadedModel, shapes: Mapping[str, Sequence[int]], outputs: Mapping[str, bool]
    ) -> None:
        """Reserves, from the header of a tensor request (its inputs' shapes, the outputs it asks for and whether
        as binary data) and before any tensor is converted, what the rest of it will hold: 413 past MAX_BATCH_ROWS
        or MAX_REQUEST_BYTES, 503 past the memory budget."""
        advice = "" if all(outputs.values()) else USE_BINARY
        needed = model.cost.request_bytes(shapes, outputs)
        lease.reserve(needed, "its tensors, their inference and its outputs", advice=advice)

    async def infer_tensor(
        self,
        model: LoadedModel,
        feeds: Tensors,
        *,
        mode: ModeChoice | None,
        arrived: float,
        protocol: Protocol,
        lease: Lease,
        outputs: Mapping[str, bool],
    ) -> Inference:
        """Inputs by name, checked against the signature, to the ensemble's outputs by name. The request reserved
        its memory with reserve_tensors; outputs whose dimensions the signature leaves open, reserved as one
        element each, reserve what they really hold before they are encoded."""
        chosen = model.selector.pick(mode)
        with self._outcome(chosen, protocol), self.admission.ticket():
            inference = await self._infer(model, feeds, chosen)
            sizes = {name: (inference.outputs[name].size, inference.outputs[name].itemsize) for name in outputs}
            rows = model.cost.rows({name: feed.shape for name, feed in feeds.items()})
            unforeseen = encoded_bytes(sizes, outputs) - model.cost.output_bytes(rows, outputs)
            advice = "" if all(outputs.values()) else USE_BINARY
            lease.reserve(unforeseen, "its outputs, larger than the signature says", advice=advice)
        self._record(model, inference, arrived, inference.cpu_s, protocol)
        return inference

    async def _infer(self, model: LoadedModel, feeds: Tensors, mode: Mode) -> Inference:
        try:
            admitted = await self.admission.run(
                lambda: model.runtime.infer_measured(feeds, mode), self.settings.request_timeout_s
            )
        except ServiceError:
            raise
        except Exception as exc:  # ONNX Runtime's own error types: a JSON 500 naming the request id, cause in the log
            raise InferenceFailed(f"the {mode} inference failed") from exc
        measured = admitted.value
        return Inference(mode, measured.outputs, admitted.waited_s, measured.seconds, measured.cpu_s)

    @contextmanager
    def _outcome(self, mode: Mode, protocol: Protocol) -> Iterator[None]:
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
            self.metrics.predictions.labels(mode, protocol, outcome).inc()
            raise

    def _record(
        self, model: LoadedModel, inference: Inference, arrived: float, cpu_s: float, protocol: Protocol
    ) -> None:
        mode, request_s = inference.mode, time.perf_counter() - arrived
        self.metrics.cpu_seconds.labels(mode).observe(cpu_s)
        self.metrics.predictions.labels(mode, protocol, "ok").inc()
        self.metrics.slot_wait_seconds.labels(mode).observe(inference.queue_s)
        self.metrics.inference_seconds.labels(mode).observe(inference.inference_s)
        self.metrics.request_seconds.labels(mode, protocol).observe(request_s)
        model.recent.record(mode, request_s, inference.inference_s, cpu_s)

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

    def _decode_and_preprocess(self, model: LoadedModel, data: bytes, lease: Lease) -> tuple[Tensors, float, float]:
        spec = model.image_spec()
        start = time.perf_counter()
        max_pixels = self.settings.image_pixel_limit(spec.width, spec.height)
        opened = imaging.open_image(data, max_pixels=max_pixels, target_size=(spec.width, spec.height))
        batch_shape = {spec.input: (1, *spec.shape)}
        lease.reserve(decode_bytes(*opened.size), "the decoded image")
        every_output = dict.fromkeys(model.manifest.signature.output_names, True)
        lease.reserve(model.cost.request_bytes(batch_shape, every_output), "its inference")
        image = imaging.decode(opened)
        decoded = time.perf_counter()
        input_spec = model.manifest.signature.input(spec.input)
        assert input_spec is not None  # the manifest's validator checks it
        batch = imaging.preprocess(image, spec, input_spec.dtype)
        return {spec.input: batch}, decoded - start, time.perf_counter() - decoded


def _mask_png(classes: Sequence[str], mask_scores: np.ndarray) -> bytes:
    """mask_scores: [classes, H, W] of one image."""
    return imaging.encode_mask_png(mask_scores.argmax(axis=0).astype(np.uint8), len(classes))
