"""The core every protocol shares: admission, mode choice, preprocess -> infer -> postprocess, measurements.

The HTTP routers only translate between their wire format and the calls here (as MLServer's data plane).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np

from app import imaging
from app.admission import Admission
from app.auto import AutoChoice
from app.cpu import timed_cpu
from app.errors import InferenceFailed, InferenceTimeout, NotAnImageModel, Overloaded, ServiceError
from app.metrics import Metrics
from app.modes import ModeSelector
from app.priority import lower_thread_priority
from app.runtime import EnsembleRuntime, Tensors
from app.settings import Settings, available_cores
from app.stats import RecentLatencies
from ensemble_contract.manifest import ImageSpec, Manifest
from ensemble_contract.modes import Mode, ModeChoice

T = TypeVar("T")


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
    def __init__(
        self, settings: Settings, runtime: EnsembleRuntime, metrics: Metrics, auto: AutoChoice | None = None
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.manifest: Manifest = runtime.manifest
        self.auto = auto
        self.admission = Admission(runtime.slots, settings.max_queue, settings.max_queue_wait_ms / 1000)
        self.admission.service_s = runtime.typical_inference_s  # the warm-up's, until requests measure it
        self.selector = ModeSelector(settings.default_mode, runtime.modes, auto.mode if auto else None)
        self.recent = RecentLatencies(settings.stats_window_s, runtime.modes)
        # Decoding and mask encoding run off the event loop, a few at a time (they are CPU-bound too).
        self._image_pool = ThreadPoolExecutor(
            available_cores(), thread_name_prefix="image", initializer=lower_thread_priority
        )
        self.ready = True
        self._draining_since: float | None = None

    async def predict_image(
        self, data: bytes, *, mode: ModeChoice | None, with_mask: bool, arrived: float
    ) -> ImagePrediction:
        """One encoded image to label probabilities (and a mask). `arrived`: time.perf_counter() at arrival."""
        image = self.image_spec()
        chosen = self.selector.pick(mode)
        with self._outcome(chosen), self.admission.ticket():
            start = time.perf_counter()
            (batch, decode_s, preprocess_s), decode_cpu_s = await self._off_loop(
                timed_cpu, partial(self._decode_and_preprocess, data)
            )
            self.metrics.decode_seconds.observe(decode_s)
            self.metrics.preprocess_seconds.observe(preprocess_s)
            inference = await self._infer(batch, chosen)
        mask_png, mask_cpu_s = None, 0.0
        if with_mask and image.mask_output is not None:
            mask = inference.outputs[image.mask_output][0]
            mask_png, mask_cpu_s = await self._off_loop(timed_cpu, partial(self._mask_png, mask))
        cpu_s = decode_cpu_s + inference.cpu_s + mask_cpu_s
        self._record(inference, arrived, cpu_s)
        scores, member_scores = None, None
        if image.scores_output is not None:
            if not np.isfinite(inference.outputs[image.scores_output]).all():
                raise InferenceFailed(f"the {chosen} inference returned scores that are not finite")
            scores = image.probabilities(inference.outputs[image.scores_output][0])
            stacked = self._members_output(image.scores_output)
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

    def image_spec(self) -> ImageSpec:
        """How /predict reads an image; NotAnImageModel when the model takes none."""
        if self.manifest.image is None:
            inputs = ", ".join(t.describe() for t in self.manifest.signature.inputs)
            raise NotAnImageModel(
                f"model {self.manifest.name} takes tensors ({inputs}), not images: POST them to "
                f"/v2/models/{self.manifest.name}/infer"
            )
        return self.manifest.image

    def _members_output(self, output: str) -> str | None:
        return next((c.members_output for c in self.manifest.combine if c.output == output), None)

    async def infer_tensor(self, feeds: Tensors, *, mode: ModeChoice | None, arrived: float) -> Inference:
        """Inputs by name, checked against the signature, to the ensemble's outputs by name."""
        chosen = self.selector.pick(mode)
        with self._outcome(chosen), self.admission.ticket():
            inference = await self._infer(feeds, chosen)
        self._record(inference, arrived, inference.cpu_s)
        return inference

    async def _infer(self, feeds: Tensors, mode: Mode) -> Inference:
        try:
            admitted = await self.admission.run(
                lambda: self.runtime.infer_measured(feeds, mode), self.settings.request_timeout_s
            )
        except ServiceError:
            raise
        except Exception as exc:  # ONNX Runtime's own error types: a JSON 500 naming the request id, cause in the log
            raise InferenceFailed(f"the {mode} inference failed") from exc
        measured = admitted.value
        return Inference(mode, measured.outputs, admitted.waited_s, measured.seconds, measured.cpu_s)

    @contextmanager
    def _outcome(self, mode: Mode) -> Iterator[None]:
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
            self.metrics.predictions.labels(mode, outcome).inc()
            raise

    def _record(self, inference: Inference, arrived: float, cpu_s: float) -> None:
        mode, request_s = inference.mode, time.perf_counter() - arrived
        self.metrics.cpu_seconds.labels(mode).observe(cpu_s)
        self.metrics.predictions.labels(mode, "ok").inc()
        self.metrics.slot_wait_seconds.labels(mode).observe(inference.queue_s)
        self.metrics.inference_seconds.labels(mode).observe(inference.inference_s)
        self.metrics.request_seconds.labels(mode).observe(request_s)
        self.recent.record(mode, request_s, inference.inference_s, cpu_s)

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
        self.runtime.close()

    async def _off_loop(self, function: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._image_pool, function, *args)

    def _decode_and_preprocess(self, data: bytes) -> tuple[Tensors, float, float]:
        spec = self.image_spec()
        start = time.perf_counter()
        image = imaging.decode(data, max_pixels=self.settings.max_image_pixels, target_size=(spec.width, spec.height))
        decoded = time.perf_counter()
        input_spec = self.manifest.signature.input(spec.input)
        assert input_spec is not None  # the manifest's validator checks it
        batch = imaging.preprocess(image, spec, input_spec.dtype)
        return {spec.input: batch}, decoded - start, time.perf_counter() - decoded

    def _mask_png(self, mask_scores: np.ndarray) -> bytes:
        """mask_scores: [classes, H, W] of one image."""
        classes = self.image_spec().mask_classes
        return imaging.encode_mask_png(mask_scores.argmax(axis=0).astype(np.uint8), len(classes))
