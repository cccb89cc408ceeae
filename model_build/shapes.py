"""A deterministic synthetic "shapes" data set, made on the fly from a seed (no downloads).

Each image holds 1-3 shapes (circle, square, triangle, cross) at random positions, sizes, rotations and
colours, filled or outlined with varied stroke widths, overlapping or not, on a flat, gradient or noise
background. Shapes are drawn at 4x the resolution and down-sampled, so edges are anti-aliased the way
other drawing software renders them. Each image comes with a per-pixel class mask (0 = background,
i = LABELS[i - 1]; a later shape covers an earlier one) and a multi-label presence vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from model_build.data import Batch

LABELS = ("circle", "square", "triangle", "cross")
SUPERSAMPLING = 4
MIN_VISIBLE_FRACTION = 0.002
TEST_SET_SEED = 20_260_000  # training seeds are small integers and never reach it


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:  # flat
        return np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).astype(np.float32)
    if kind == 1:  # linear gradient in a random direction between two colours
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / size
        t = (xs * math.cos(angle) + ys * math.sin(angle) + 1.5) / 3
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        return (a + (b - a) * t[..., None]).astype(np.float32)
    base = rng.uniform(40, 215, 3)  # noise around a colour
    return np.clip(base + rng.normal(0, rng.uniform(5, 30), (size, size, 3)), 0, 255).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour far enough from the background's mean that the shape is visible."""
    mean = background.reshape(-1, 3).mean(axis=0)
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) > 110:
            break
    return colour


def _polygon(label: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if label == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(x * r / math.sqrt(2), y * r / math.sqrt(2)) for x, y in corners]
    elif label == "triangle":
        points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign with arms a third of its span thick
        t = r / 3
        points = [
            (-t, -r),
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
        ]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def _draw_shape(
    coverage: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, label: str, rng: np.random.Generator, big: int
) -> None:
    """Draws one shape into a coverage layer (255 inside) and into the class mask, both at 4x size."""
    r = rng.uniform(0.15, 0.3) * big
    cx, cy = rng.uniform(r * 0.8, big - r * 0.8, 2)
    filled = rng.random() < 0.6
    # Outlines 1-2.5 output pixels wide at the smallest shapes: visible after down-sampling, yet thin.
    stroke = 0 if filled else round(rng.uniform(0.14, 0.3) * r)
    points = None if label == "circle" else _polygon(label, cx, cy, r, rng.uniform(0, 2 * math.pi))
    for layer, value in ((coverage, 255), (mask, LABELS.index(label) + 1)):
        fill = value if filled else None
        if points is None:
            layer.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=value, width=stroke)
        else:
            layer.polygon(points, fill=fill, outline=value, width=stroke)


def render(seed: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3), its class mask (uint8 HxW) and presence vector, from its seed alone."""
    rng = np.random.default_rng(seed)
    big = size * SUPERSAMPLING
    image = _background(rng, size)
    mask_image = Image.new("L", (big, big), 0)
    mask = ImageDraw.Draw(mask_image)
    presence = np.zeros(len(LABELS), np.float32)
    for _ in range(rng.integers(1, 4)):
        label_index = int(rng.integers(len(LABELS)))
        presence[label_index] = 1
        colour = _contrasting_colour(rng, image)
        coverage_image = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(coverage_image), mask, LABELS[label_index], rng, big)
        # Box down-sampling of the 4x coverage gives anti-aliased edges.
        alpha = np.asarray(coverage_image.resize((size, size), Image.Resampling.BOX), np.float32)[..., None] / 255
        image = image * (1 - alpha) + colour * alpha
    class_mask = np.asarray(mask_image.resize((size, size), Image.Resampling.NEAREST))
    # A shape (almost) wholly covered by later ones is not visible, so it is not present.
    pixels = np.bincount(class_mask.ravel(), minlength=len(LABELS) + 1)[1:]
    visible = pixels >= MIN_VISIBLE_FRACTION * size * size
    return np.round(image).astype(np.uint8), class_mask, presence * visible


def make_batch(seeds: range | list[int], size: int) -> Batch:
    images, masks, presence = zip(*(render(seed, size) for seed in seeds), strict=True)
    return Batch(np.stack(images), np.stack(masks), np.stack(presence))


def training_seeds(member_seed: int, step: int, batch_size: int) -> range:
    """The image seeds of one training step: disjoint across steps and members, below the test seed."""
    start = (member_seed * 1_000_003 + step * batch_size) % (TEST_SET_SEED - batch_size)
    return range(start, start + batch_size)


def held_out_set(size: int, count: int = 500) -> Batch:
    """The held-out set: fixed seeds that training never draws."""
    return make_batch(range(TEST_SET_SEED, TEST_SET_SEED + count), size)


@dataclass(frozen=True)
class ShapesData:
    """The shapes as a build's TrainingData: square images only, and no validation set (the last weights are
    kept: with images never seen twice, the last are the best)."""

    labels: tuple[str, ...] = LABELS
    has_masks: bool = True

    @staticmethod
    def _side(size: tuple[int, int]) -> int:
        height, width = size
        if height != width:
            raise ValueError(f"the shapes are square; got {height}x{width}")
        return height

    def training_batch(self, member_seed: int, step: int, batch_size: int, size: tuple[int, int]) -> Batch:
        return make_batch(training_seeds(member_seed, step, batch_size), self._side(size))

    def validation_set(self, size: tuple[int, int]) -> Batch | None:
        return None

    def test_set(self, size: tuple[int, int], count: int) -> Batch:
        return held_out_set(self._side(size), count)

    def calibration_set(self, size: tuple[int, int], count: int) -> Batch:
        return make_batch(range(count), self._side(size))
