"""/predict's images: the image front's part of an inference, which the data plane runs as it runs any front's (a
FrontRequest). The upload is read once the model is known to take images, decoded into the model's input once
admitted (its memory and its inference's reserved first), and its outputs made into label probabilities and a mask
PNG. Decoding and drawing the mask run on the data plane's conversion threads, off the event loop, and their CPU
time is the prediction's.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from app.core import imaging
from app.core.cost import decode_bytes
from app.core.dataplane import DataPlane
from app.core.memory import Lease
from app.core.model import LoadedModel
from app.engine.cpu import timed_cpu
from app.engine.runtime import Tensors
from app.errors import InferenceFailed
from ensemble_contract.manifest import ImageSpec
from ensemble_contract.modes import Mode, ModeChoice
from ensemble_contract.picture import input_batch


@dataclass(frozen=True)
class ImageOutputs:
    image: ImageSpec  # of the model that answered
    probabilities: np.ndarray | None  # [labels], when the model scores labels
    member_probabilities: np.ndarray | None  # [M, labels], when the fused graph gives each member's scores
    mask_png: bytes | None  # palette PNG of the mask output's argmax, at model resolution


class ImageRequest:
    """One encoded image, read by `read` once the model is known to take images (NotAnImageModel before any byte is
    read otherwise), to label probabilities (and a mask). Keeps how long decoding and preprocessing took, and when
    decoding started, for the answer's timings."""

    model_name = None  # whichever model is served

    def __init__(
        self, dataplane: DataPlane, read: Callable[[], Awaitable[bytes]], mode: ModeChoice | None, with_mask: bool
    ) -> None:
        self.dataplane = dataplane
        self.read = read
        self.mode = mode
        self.with_mask = with_mask
        self.started = 0.0  # time.perf_counter() when decoding started
        self.decode_s = 0.0
        self.preprocess_s = 0.0
        self._data = b""

    async def check(self, model: LoadedModel, lease: Lease) -> int:
        model.image_spec()
        self._data = await self.read()
        return 1

    async def feeds(self, model: LoadedModel, lease: Lease) -> tuple[Tensors, float]:
        self.started = time.perf_counter()
        decoding = partial(self._decode_and_preprocess, model, model.image_spec(), lease)
        (feeds, self.decode_s, self.preprocess_s), cpu_s = await self.dataplane.off_loop(timed_cpu, decoding)
        self.dataplane.metrics.decode_seconds.observe(self.decode_s)
        self.dataplane.metrics.preprocess_seconds.observe(self.preprocess_s)
        return feeds, cpu_s

    async def answer(
        self, model: LoadedModel, mode: Mode, outputs: Tensors, lease: Lease
    ) -> tuple[ImageOutputs, float]:
        image = model.image_spec()
        scores, member_scores = None, None
        if image.scores_output is not None:
            if not np.isfinite(outputs[image.scores_output]).all():
                raise InferenceFailed(f"the {mode} inference returned scores that are not finite")
            scores = image.probabilities(outputs[image.scores_output][0])
            stacked = model.members_output(image.scores_output)
            member_scores = image.probabilities(outputs[stacked][0]) if stacked else None
        mask_png, cpu_s = None, 0.0
        if self.with_mask and image.mask_output is not None:
            mask = outputs[image.mask_output][0]
            mask_png, cpu_s = await self.dataplane.off_loop(timed_cpu, partial(_mask_png, image.mask_classes, mask))
        return ImageOutputs(image, scores, member_scores, mask_png), cpu_s

    def _decode_and_preprocess(
        self, model: LoadedModel, image: ImageSpec, lease: Lease
    ) -> tuple[Tensors, float, float]:
        start = time.perf_counter()
        max_pixels = self.dataplane.settings.image_pixel_limit(image.width, image.height)
        opened = imaging.open_image(self._data, max_pixels=max_pixels, target_size=(image.width, image.height))
        lease.reserve(decode_bytes(*opened.size), "the decoded image")
        every_output = dict.fromkeys(model.manifest.signature.output_names, True)
        lease.reserve(model.cost.request_bytes({image.input: (1, *image.shape)}, every_output), "its inference")
        decoded_image = imaging.decode(opened)
        decoded = time.perf_counter()
        input_spec = model.manifest.signature.input(image.input)
        assert input_spec is not None  # the manifest's validator checks it
        batch = input_batch(decoded_image, image, input_spec.dtype)
        return {image.input: batch}, decoded - start, time.perf_counter() - decoded


def _mask_png(classes: Sequence[str], mask_scores: np.ndarray) -> bytes:
    """mask_scores: [classes, H, W] of one image."""
    return imaging.encode_mask_png(mask_scores.argmax(axis=0).astype(np.uint8), len(classes))
