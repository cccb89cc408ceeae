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
from typing import TypeVar

import numpy as np

from app import imaging
from app.admission import Admission
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


@dataclass(frozen=True)
class Inference:
    """The outputs of one batch, the mode that computed them, and how long it took."""

    mode: Mode
    outputs: Tensors
    queue_s: float
    inference_s: float


@dataclass(frozen=True)
class ImagePrediction:
    mode: Mode
    probabilities: np.ndarray | None  # [labels], when the model scores labels
    member_probabilities: np.ndarray | None  # [M, labels], when the fused graph gives each member's scores
    mask_png: bytes | None  # palette PNG of the mask output's argmax, at model resolution
    timings: Timings


class DataPlane:
    def __init__(self, settings: Settings, runtime: EnsembleRuntime, metrics: Metrics) -> None:
        self.settings = settings
        self.runtime = runtime
        self.metrics = metrics
        self.manifest: Manifest = runtime.manifest
        self.admission = Admission(settings.max_concurrent_inferences, settings.max_queue)
        self.selector = ModeSelector(settings.default_mode, runtime.modes)
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
            batch, decode_s, preprocess_s = await self._off_loop(self._decode_and_preprocess, data)
            self.metrics.decode_seconds.observe(decode_s)
            self.metrics.preprocess_seconds.observe(preprocess_s)
            inference = await self._infer(batch, chosen)
        mask_png = None
        if with_mask and image.mask_output is not None:
            mask_png = await self._off_loop(self._mask_png, inference.outputs[image.mask_output][0])
        self._record(inference, arrived)
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
            Timings(decode_s, preprocess_s, inference.queue_s, inference.inference_s, time.perf_counter() - start),
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
        self._record(inference, arrived)
        return inference

    async def _infer(self, feeds: Tensors, mode: Mode) -> Inference:
        try:
            admitted = await self.admission.run(
                lambda: self._timed_inference(feeds, mode), self.settings.request_timeout_s
            )
        except ServiceError:
            raise
        except Exception as exc:  # ONNX Runtime's own error types: a JSON 500 naming the request id, cause in the log
            raise InferenceFailed(f"the {mode} inference failed") from exc
        outputs, inference_s = admitted.value
        return Inference(mode, outputs, admitted.waited_s, inference_s)

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

    def _record(self, inference: Inference, arrived: float) -> None:
        mode, request_s = inference.mode, time.perf_counter() - arrived
        self.metrics.predictions.labels(mode, "ok").inc()
        self.metrics.slot_wait_seconds.labels(mode).observe(inference.queue_s)
        self.metrics.inference_seconds.labels(mode).observe(inference.inference_s)
        self.metrics.request_seconds.labels(mode).observe(request_s)
        self.recent.record(mode, request_s, inference.inference_s)

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

    def _timed_inference(self, feeds: Tensors, mode: Mode) -> tuple[Tensors, float]:
        start = time.perf_counter()
        outputs = self.runtime.infer(feeds, mode)
        return outputs, time.perf_counter() - start

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
