"""A user's labelled images, for `python -m model_build build --data DIR` (the layout: docs/build.md):

    DIR/images/NAME.png|.jpg  any size, RGB or grey (made upright RGB as the service does: ensemble_contract.picture)
    DIR/labels.csv            header `file,<label>,...[,split]`; a row per image: its name, then 0 or 1 per label
    DIR/masks/NAME.png        optional, one per image: pixel value 1 + the label's position in the header, 0 background

`read_folder` reads all of it before anything trains and refuses, naming the file and line, what does not fit.
Training then reads the images lazily through a cache of a bounded size (CACHE_BYTES), so a folder larger than
memory trains.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ensemble_contract.picture import stretched, upright_rgb
from model_build.data import Batch

IMAGES, LABELS_CSV, MASKS = "images", "labels.csv", "masks"
SPLIT_COLUMN = "split"
SPLITS = ("train", "validation", "test")
CACHE_BYTES = 256 * 2**20  # decoded, resized images (and masks) kept between training steps, per process
SHOWN_PROBLEMS = 20
RARE = 0.1  # a label in fewer than this share of the training images (or absent from fewer) is reported as imbalanced


class DatasetError(ValueError):
    """What does not fit the layout, every problem found (the first SHOWN_PROBLEMS listed)."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        super().__init__(f"{root} cannot be trained on ({len(problems)} problem(s)):\n  {shown}{more}")
        self.problems = problems


@dataclass(frozen=True)
class Example:
    file: str  # under images/
    line: int  # in labels.csv
    presence: tuple[float, ...]
    split: str


def default_split(file: str) -> str:
    """80 % train, 10 % validation, 10 % test, by a hash of the file name: the same split on every machine, and an
    image keeps its split when others are added."""
    bucket = int.from_bytes(hashlib.sha256(file.encode()).digest()[:4], "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def mask_name(file: str) -> str:
    return f"{Path(file).stem}.png"


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # the whole file: a truncated one fails here, not in the middle of training
    return image


@dataclass(frozen=True)
class LabelledFolder:
    """A folder that `read_folder` accepted. Picklable: training processes each get their own cache."""

    root: Path
    labels: tuple[str, ...]
    examples: tuple[Example, ...]
    has_masks: bool
    sha256: str  # of labels.csv and every image and mask: the build's fingerprint of its data
    _cache: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    @cached_property
    def _splits(self) -> dict[str, tuple[int, ...]]:
        """Each split's examples, found once: training asks for the train split at every step."""
        return {split: tuple(i for i, e in enumerate(self.examples) if e.split == split) for split in SPLITS}

    def indices(self, split: str) -> tuple[int, ...]:
        return self._splits[split]

    def counts(self, split: str) -> dict[str, int]:
        """Images per label in a split: what the build reports as the classes' balance."""
        rows = [self.examples[i].presence for i in self.indices(split)]
        totals = np.sum(rows, axis=0) if rows else np.zeros(len(self.labels))
        return {label: int(total) for label, total in zip(self.labels, totals, strict=True)}

    def describe(self) -> list[str]:
        """What the build log says of the folder: the splits, each label's images, the rare and the common ones."""
        sizes = {split: len(self.indices(split)) for split in SPLITS}
        lines = [
            f"{len(self.examples)} images, {len(self.labels)} labels, {'with' if self.has_masks else 'no'} masks; "
            + ", ".join(f"{split} {count}" for split, count in sizes.items())
        ]
        for label, count in self.counts("train").items():
            share = count / max(1, sizes["train"])
            note = (
                " (rare: few to learn from)" if share < RARE else " (common: absent in few)" if share > 1 - RARE else ""
            )
            lines.append(f"  {label}: in {count} of {sizes['train']} training images{note}")
        return lines

    def _load(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        if self._cache is None:  # sized on first use: what CACHE_BYTES holds of images this size
            per_image = size[0] * size[1] * (4 if self.has_masks else 3)
            object.__setattr__(self, "_cache", lru_cache(maxsize=max(1, CACHE_BYTES // per_image))(self._read))
        return self._cache(index, size)

    def _read(self, index: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        height, width = size
        example = self.examples[index]
        with Image.open(self.root / IMAGES / example.file) as image:
            pixels = stretched(upright_rgb(image), height, width)  # as POST /predict does
        if not self.has_masks:
            return pixels, None
        with Image.open(self.root / MASKS / mask_name(example.file)) as mask:
            return pixels, np.asarray(mask.resize((width, height), Image.Resampling.NEAREST), np.uint8)

    def batch(self, indices: Sequence[int], size: tuple[int, int]) -> Batch:
        loaded = [self._load(i, size) for i in indices]
        masks = np.stack([mask for _, mask in loaded]) if self.has_masks else None  # type: ignore[misc]
        presence = np.array([self.examples[i].presence for i in indices], np.float32)
        return Batch(np.stack([image for image, _ in loaded]), masks, presence)

    def training_batch(self, member_seed: int, step: int, batch_size: int, size: tuple[int, int]) -> Batch:
        """Epochs of the train split, each in an order drawn from the member's seed and the epoch alone."""
        train = np.array(self.indices("train"))
        positions = range(step * batch_size, (step + 1) * batch_size)
        orders: dict[int, np.ndarray] = {}
        chosen = []
        for position in positions:
            epoch, offset = divmod(position, len(train))
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([member_seed, epoch]).permutation(train)
            chosen.append(int(orders[epoch][offset]))
        return self.batch(chosen, size)

    def validation_set(self, size: tuple[int, int]) -> Batch | None:
        indices = self.indices("validation")
        return self.batch(indices, size) if indices else None

    def test_set(self, size: tuple[int, int], count: int) -> Batch:
        return self.batch(self.indices("test")[:count], size)

    def calibration_set(self, size: tuple[int, int], count: int) -> Batch:
        return self.batch(self.indices("train")[:count], size)


def read_folder(root: Path) -> LabelledFolder:
    """Reads and checks the whole folder (every image and mask decoded once); DatasetError lists what is wrong."""
    problems: list[str] = []
    if not (root / IMAGES).is_dir() or not (root / LABELS_CSV).is_file():
        raise DatasetError(root, [f"expected {IMAGES}/ and {LABELS_CSV} in it (docs/build.md has the layout)"])
    digest = hashlib.sha256((root / LABELS_CSV).read_bytes())
    labels, examples = _read_labels(root / LABELS_CSV, problems)
    has_masks = (root / MASKS).is_dir()
    for example in examples:
        where = f"{IMAGES}/{example.file} ({LABELS_CSV} line {example.line})"
        size = _check_file(root / IMAGES / example.file, where, digest, problems)
        if has_masks and size is not None:
            _check_mask(root / MASKS / mask_name(example.file), size, len(labels), digest, problems)
    for split in ("train", "test"):
        if examples and not any(example.split == split for example in examples):
            problems.append(f"the {split} split is empty: add images, or give a `{SPLIT_COLUMN}` column")
    train = [example.presence for example in examples if example.split == "train"]
    for position, label in enumerate(labels):
        if examples and not any(presence[position] for presence in train):
            problems.append(f"label {label!r} is in no image of the train split: nothing to learn it from")
    if problems:
        raise DatasetError(root, problems)
    return LabelledFolder(root.resolve(), labels, tuple(examples), has_masks, digest.hexdigest())


def _read_labels(path: Path, problems: list[str]) -> tuple[tuple[str, ...], list[Example]]:
    with path.open(newline="", encoding="utf-8-sig") as lines:
        rows = list(csv.reader(lines))
    if not rows or len(rows[0]) < 2:
        problems.append(f"{LABELS_CSV} line 1: a header is needed: the file column, then one column per label")
        return (), []
    header = [name.strip() for name in rows[0]]
    split_column = header.index(SPLIT_COLUMN) if SPLIT_COLUMN in header else None
    label_columns = [i for i in range(1, len(header)) if i != split_column]
    labels = tuple(header[i] for i in label_columns)
    repeated = [name for name, count in Counter(labels).items() if count > 1 or not name]
    if not labels or repeated:
        problems.append(f"{LABELS_CSV} line 1: label names must be unique and not empty, got {list(labels)}")
        return (), []
    examples, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{LABELS_CSV} line {line}"
        if len(row) != len(header):
            problems.append(f"{where}: {len(row)} columns, the header has {len(header)}")
            continue
        file = row[0].strip()
        if file in seen:
            problems.append(f"{where}: {file!r} is listed twice")
        seen.add(file)
        values = [row[i].strip() for i in label_columns]
        bad = [(labels[j], value) for j, value in enumerate(values) if value not in ("0", "1")]
        if bad:
            problems.append(f"{where}: label {bad[0][0]!r} is {bad[0][1]!r}; a label is 0 or 1")
            continue
        split = row[split_column].strip() if split_column is not None else default_split(file)
        if split not in SPLITS:
            problems.append(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
            continue
        examples.append(Example(file, line, tuple(float(value) for value in values), split))
    if not examples and not problems:
        problems.append(f"{LABELS_CSV}: no image is listed")
    return labels, examples


def _check_file(path: Path, name: str, digest: Any, problems: list[str]) -> tuple[int, int] | None:
    """The image's upright size, once it decodes; None (and a problem) otherwise."""
    if not path.is_file():
        problems.append(f"{name}: no such file")
        return None
    data = path.read_bytes()
    digest.update(data)
    try:
        with _decode(data) as image:
            return upright_rgb(image).size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        problems.append(f"{name}: not a readable image ({error})")
        return None


def _check_mask(path: Path, size: tuple[int, int], labels: int, digest: Any, problems: list[str]) -> None:
    name = f"{MASKS}/{path.name}"
    if not path.is_file():
        problems.append(f"{name}: no such file (with a {MASKS}/ folder, every image needs its mask)")
        return
    data = path.read_bytes()
    digest.update(data)
    try:
        with _decode(data) as mask:
            if mask.mode not in ("L", "P", "1"):
                problems.append(f"{name}: a mask is a one-channel PNG of class indices, this one is {mask.mode}")
                return
            if mask.size != size:
                problems.append(f"{name}: {mask.size[0]}x{mask.size[1]}, its image is {size[0]}x{size[1]}")
                return
            highest = int(np.asarray(mask).max())
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        problems.append(f"{name}: not a readable PNG ({error})")
        return
    if highest > labels:
        problems.append(f"{name}: class index {highest} is out of range (0 background, 1..{labels} the labels)")
