"""A user's labelled images in the layout of docs/build.md, drawn by a generator of its own (not model_build.shapes):
Pillow's ellipses, rectangles and chords of three colours on noisy backgrounds, saved as JPEG of mixed sizes (a
few as grey PNGs), with label columns not in alphabetical order and, unless told otherwise, masks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABELS = ("sun", "bar", "leaf")  # the header's order, not the alphabet's
SIZES = ((48, 40), (64, 64), (80, 56), (40, 72))  # width, height
COLOURS = {"sun": (235, 200, 30), "bar": (40, 70, 210), "leaf": (40, 160, 60)}


def _draw(draw: ImageDraw.ImageDraw, label: str, box: tuple[float, float, float, float], value: object) -> None:
    left, top, right, bottom = box
    if label == "sun":
        draw.ellipse(box, fill=value)
    elif label == "bar":
        middle = (top + bottom) / 2
        draw.rectangle((left, middle - (bottom - top) / 6, right, middle + (bottom - top) / 6), fill=value)
    else:
        draw.chord(box, 30, 210, fill=value)


def write_own_data(root: Path, images: int = 200, masks: bool = True, seed: int = 7) -> Path:
    """Writes `images` labelled images under `root` (images/, labels.csv, masks/ if `masks`); returns `root`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    rows = []
    for index in range(images):
        width, height = SIZES[index % len(SIZES)]
        background = rng.normal(128, 25, (height, width, 3)).clip(0, 255).astype(np.uint8)
        picture = Image.fromarray(background)
        mask = Image.new("L", (width, height), 0)
        present = rng.random(len(LABELS)) < 0.5
        for position in np.flatnonzero(present):
            label = LABELS[position]
            side = rng.uniform(0.35, 0.6) * min(width, height)
            left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
            box = (left, top, left + side, top + side)
            _draw(ImageDraw.Draw(picture), label, box, COLOURS[label])
            _draw(ImageDraw.Draw(mask), label, box, int(position) + 1)
        grey = index % 10 == 9
        name = f"picture-{index:04d}.{'png' if grey else 'jpg'}"
        if grey:
            picture.convert("L").save(root / "images" / name)
        else:
            picture.save(root / "images" / name, quality=90)
        if masks:
            mask.save(root / "masks" / f"picture-{index:04d}.png")
        rows.append([name, *(int(flag) for flag in present)])
    with (root / "labels.csv").open("w", newline="") as out:
        csv.writer(out).writerows([["file", *LABELS], *rows])
    return root
