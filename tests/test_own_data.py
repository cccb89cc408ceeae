"""`python -m model_build build --data DIR` on images nobody here drew (tests/own_data.py): the build learns their
labels (well above the majority's accuracy on their test split), the service serves what it built, a folder
without masks gives a model without a mask output, every kind of broken folder is refused with the file and the
line named and nothing written, and a folder whose decoded images exceed the memory a process is allowed trains."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from app.settings import Settings
from ensemble_contract.manifest import load_manifest
from model_build.folder import LABELS_CSV, default_split, read_folder
from tests.own_data import LABELS, write_own_data
from tests.support import live_server

ROOT = Path(__file__).resolve().parents[1]
MARGIN = 0.15  # "well above chance": over the accuracy of always answering each label's commonest value
# The test preset's training for 60 steps: what the quick sweep trains with the same --steps, so that it reuses
# own_model's members.
OWN_TRAINING = ("--preset", "test", "--steps", "60")


def build(data: Path, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "model_build", "build", "--data", str(data), "--out", str(out), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def held_out_labels(data: Path) -> dict[str, tuple[int, ...]]:
    """The test split's images and their labels, as labels.csv and the default split say."""
    with (data / LABELS_CSV).open() as rows:
        listed = list(csv.reader(rows))[1:]
    return {row[0]: tuple(map(int, row[1:])) for row in listed if default_split(row[0]) == "test"}


def majority_accuracy(truth: np.ndarray) -> float:
    commonest = truth.mean(axis=0) >= 0.5
    return float((truth == commonest).mean())


@pytest.fixture(scope="module")
def own_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_own_data(tmp_path_factory.mktemp("own") / "garden")


@pytest.fixture(scope="module")
def own_model(own_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The test preset's ensemble (two width-2 members, 32x32) built on the folder: its directory and log."""
    out = tmp_path_factory.mktemp("own-model") / "garden"
    result = build(own_data, out, *OWN_TRAINING)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stderr


def test_a_build_on_a_users_images_learns_their_labels(own_model: tuple[Path, str], own_data: Path) -> None:
    out, log = own_model
    manifest = load_manifest(out)
    assert manifest.name == "garden" and manifest.image is not None
    assert manifest.image.labels == LABELS and manifest.image.mask_classes == ("background", *LABELS)
    assert (manifest.image.height, manifest.image.width) == (32, 32)
    truth = np.array(list(held_out_labels(own_data).values()))
    assert manifest.ensemble_metrics is not None and manifest.ensemble_metrics.images == len(truth)
    assert manifest.ensemble_metrics.mean_label_accuracy >= majority_accuracy(truth) + MARGIN
    assert manifest.ensemble_metrics.mean_iou is not None
    assert "sun: in " in log and "training images" in log  # each label's share, reported before training
    for member in manifest.members:
        curve = (out / "training" / f"{member.name}.csv").read_text().splitlines()
        assert (
            len(curve) == 1 + int(OWN_TRAINING[-1]) and Image.open(out / "training" / f"{member.name}.png").size[0] > 0
        )
        assert f"{member.name}: trained" in log and "kept step" in log


def test_an_interrupted_build_resumes_to_the_same_weights(
    own_model: tuple[Path, str], own_data: Path, tmp_path: Path
) -> None:
    """A build of one member killed, process group and all (as a reboot would), once its checkpoint is on disk, then
    run again with --resume: it continues from the checkpoint and ends with the member an uninterrupted build made
    (own_model's first: the same width, seed, training and data)."""
    out = tmp_path / "garden"
    options = [*OWN_TRAINING, "--members", "1"]
    command = [sys.executable, "-m", "model_build", "build", "--data", str(own_data), "--out", str(out), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # against hanging only
        while not list((out / "training").glob("*.checkpoint.pt")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (out / "manifest.json").exists()  # stopped in the middle
    resumed = build(own_data, out, *options, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step" in resumed.stderr
    (member,) = load_manifest(out).members
    assert member.file.sha256 == load_manifest(own_model[0]).members[0].file.sha256
    assert not list((out / "training").glob("*.checkpoint.pt"))  # built: nothing left to resume


def test_the_service_serves_what_was_built_on_a_users_images(own_model: tuple[Path, str], own_data: Path) -> None:
    out, _ = own_model
    split = held_out_labels(own_data)
    with live_server(Settings(model_dir=out)) as server, server.client() as client:
        answers = []
        for name in split:
            picture = (own_data / "images" / name).read_bytes()
            response = client.post("/predict?mask=true", files={"file": (name, picture)})
            assert response.status_code == 200, response.text
            answers.append(response.json())
    present = np.array([[label["present"] for label in answer["labels"]] for answer in answers])
    order = [[label["name"] for label in answer["labels"]] for answer in answers]
    assert all(names == list(LABELS) for names in order)
    truth = np.array(list(split.values()))
    assert float((present == truth).mean()) >= majority_accuracy(truth) + MARGIN
    assert all(answer["mask"] is not None for answer in answers)


def test_a_folder_without_masks_builds_a_model_without_a_mask_output(tmp_path: Path) -> None:
    """Of one member, on images stretched to 32 high and 48 wide."""
    data = write_own_data(tmp_path / "no-masks", images=60, masks=False)
    result = build(data, tmp_path / "model", "--image-size", "32x48", "--steps", "8", "--members", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = load_manifest(tmp_path / "model")
    assert manifest.image is not None and manifest.image.mask_output is None and manifest.ensemble_metrics is not None
    assert manifest.ensemble_metrics.mean_iou is None
    assert (manifest.image.height, manifest.image.width) == (32, 48)  # --image-size HxW
    member = onnx.load(tmp_path / "model" / manifest.members[0].file.path)
    assert [output.name for output in member.graph.output] == ["class_probs"]
    with live_server(Settings(model_dir=tmp_path / "model")) as server, server.client() as client:
        picture = next((data / "images").iterdir())
        response = client.post("/predict?mask=true", files={"file": (picture.name, picture.read_bytes())})
        assert response.status_code == 200, response.text
        assert response.json()["mask"] is None


def test_the_sweep_on_a_users_images_names_its_pareto_front(
    own_model: tuple[Path, str], own_data: Path, tmp_path: Path
) -> None:
    """`bench sweep --data`: a single model and an ensemble of the folder's members (own_model's, trained the same
    way, so reused), timed fused and separate, scored on its test split, and the closing line naming the Pareto
    front and what the fused graph saves."""
    sweep = ["sweep", "--quick", "--data", str(own_data), "--widths", "2", "--ensembles", "2xw2", "--runs", "5"]
    sweep += ["--steps", OWN_TRAINING[-1], "--reuse-members", str(own_model[0])]
    command = [sys.executable, "-m", "bench", *sweep, "--out", str(tmp_path), "--no-docs"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "sweep.csv").open() as rows:
        measured = list(csv.DictReader(rows))
    assert {row["model"] for row in measured} == {"w2", "2xw2"}
    truth = np.array(list(held_out_labels(own_data).values()))
    assert all(float(row["mean_label_accuracy"]) > 0 and row["mean_iou"] for row in measured)
    assert load_manifest(tmp_path / "models" / "2xw2").ensemble_metrics.images == len(truth)  # type: ignore[union-attr]
    report = (tmp_path / "sweep.md").read_text()
    assert "trained on `garden` (200 images)" in report and "accuracy on its test split" in report
    closing = next(line for line in report.splitlines() if line.startswith("**On this data and this machine**"))
    # Which model is on the front is a matter of timing (quick runs, a noisy machine); that one is named is not.
    assert re.search(r"the Pareto front \(no other model both faster and more accurate\): `(w2|2xw2)`", closing)
    assert "The fused graph saves of the separate sessions' median time: `2xw2`" in closing, closing


def test_the_documented_conversion_makes_a_folder_the_build_reads(
    own_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/build.md's snippet, run as written, turns pictures sorted in a folder per label into the layout."""
    section = (ROOT / "docs" / "build.md").read_text().split("## Your own images", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    with (own_data / LABELS_CSV).open() as rows:
        listed = {row["file"]: row for row in csv.DictReader(rows)}
    for name, row in listed.items():
        for label in (label for label in LABELS if row[label] == "1"):
            (tmp_path / "photos" / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(own_data / "images" / name, tmp_path / "photos" / label / name)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/build.md", "exec"), {})  # the documentation's own code, as a reader runs it
    folder = read_folder(tmp_path / "garden")
    assert folder.labels == tuple(sorted(LABELS))
    for example in folder.examples:
        assert example.presence == tuple(float(listed[example.file][label]) for label in folder.labels)


def rewrite_cell(data: Path, line: int, column: int, value: str) -> None:
    rows = list(csv.reader((data / LABELS_CSV).open()))
    rows[line - 1][column] = value
    with (data / LABELS_CSV).open("w", newline="") as out:
        csv.writer(out).writerows(rows)


def add_split_column(data: Path, unknown_at: int | None = None) -> list[str]:
    """A `split` column: every third image in test, every fifth in validation, the rest in train; `unknown_at`: a
    line whose split is one no build knows. The splits given, in row order."""
    rows = list(csv.reader((data / LABELS_CSV).open()))
    splits = ["test" if i % 3 == 0 else "validation" if i % 5 == 0 else "train" for i in range(len(rows) - 1)]
    rows = [[*rows[0], "split"], *([*row, split] for row, split in zip(rows[1:], splits, strict=True))]
    if unknown_at is not None:
        rows[unknown_at - 1][-1] = "holdout"
    with (data / LABELS_CSV).open("w", newline="") as out:
        csv.writer(out).writerows(rows)
    return splits


def test_a_split_column_puts_each_image_in_its_split(tmp_path: Path) -> None:
    data = write_own_data(tmp_path / "split", images=30)
    splits = add_split_column(data)
    folder = read_folder(data)
    assert [example.split for example in folder.examples] == splits
    assert folder.labels == LABELS  # the split column is not a label


def no_leaf(data: Path) -> None:
    for line in range(2, 32):
        rewrite_cell(data, line, LABELS.index("leaf") + 1, "0")


BREAKAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "a missing image": (
        lambda data: (data / "images" / "picture-0003.jpg").unlink(),
        "images/picture-0003.jpg (labels.csv line 5): no such file",
    ),
    "an unreadable file": (
        lambda data: (data / "images" / "picture-0004.jpg").write_bytes(b"not a picture"),
        "images/picture-0004.jpg (labels.csv line 6): not a readable image",
    ),
    "a label that is not 0 or 1": (
        lambda data: rewrite_cell(data, 7, 2, "yes"),
        "labels.csv line 7: label 'bar' is 'yes'; a label is 0 or 1",
    ),
    "a mask of another size": (
        lambda data: Image.new("L", (10, 10)).save(data / "masks" / "picture-0005.png"),
        "masks/picture-0005.png: 10x10, its image is 64x64",
    ),
    "a mask class out of range": (
        lambda data: Image.new("L", (48, 40), 9).save(data / "masks" / "picture-0008.png"),
        "masks/picture-0008.png: class index 9 is out of range (0 background, 1..3 the labels)",
    ),
    "an empty class": (no_leaf, "label 'leaf' is in no image of the train split"),
    "an unknown split": (
        lambda data: add_split_column(data, unknown_at=4),
        "labels.csv line 4: split 'holdout' is not one of train, validation, test",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_folder_is_refused_with_what_and_where(breakage: str, tmp_path: Path) -> None:
    data = write_own_data(tmp_path / "broken", images=30)
    damage, message = BREAKAGES[breakage]
    damage(data)
    result = build(data, tmp_path / "model", "--steps", "4")
    assert result.returncode == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()  # nothing half-trained


LARGE_SIDE = 1600  # a decoded picture of 7.7 MB
LARGE_PICTURES = 48  # 369 MB decoded in all
HEADROOM = 160 * 2**20  # what the reading process may add to its address space once its modules are loaded

READ_UNDER_A_LIMIT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    from model_build.folder import read_folder

    size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[2]), size + int(sys.argv[2])))
    folder = read_folder(Path(sys.argv[1]))
    steps = 2 * len(folder.indices("train")) // 8  # two epochs
    shapes = {folder.training_batch(1, step, 8, (64, 64)).images.shape for step in range(steps)}
    try:
        np.ones(int(sys.argv[3]), np.uint8)  # the decoded folder at once
        held = True
    except MemoryError:
        held = False
    print(json.dumps({"shapes": [list(shape) for shape in shapes], "steps": steps, "whole_folder_fits": held}))
    """
)


def test_a_folder_larger_than_the_memory_allowed_trains(tmp_path: Path) -> None:
    """Read and checked whole, then two epochs of training batches, by a process whose address space may grow by
    HEADROOM alone, less than half the folder's decoded size: it reads it all, and the folder at once does not fit."""
    data = tmp_path / "large"
    (data / "images").mkdir(parents=True)
    rows = [["file", "dark", "light"]]
    for index in range(LARGE_PICTURES):
        dark = index % 2
        shade = 40 if dark else 215
        pixels = np.full((LARGE_SIDE, LARGE_SIDE, 3), shade, np.uint8)
        pixels[::97] = 255 - shade  # some structure, still small as a PNG
        Image.fromarray(pixels).save(data / "images" / f"large-{index:02d}.png", compress_level=1)
        rows.append([f"large-{index:02d}.png", str(dark), str(1 - dark)])
    with (data / LABELS_CSV).open("w", newline="") as out:
        csv.writer(out).writerows(rows)
    decoded = LARGE_PICTURES * LARGE_SIDE * LARGE_SIDE * 3
    assert decoded > 2 * HEADROOM
    command = [sys.executable, "-c", READ_UNDER_A_LIMIT, str(data), str(HEADROOM), str(decoded)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout)
    assert outcome["shapes"] == [[8, 64, 64, 3]] and outcome["steps"] > 0
    assert outcome["whole_folder_fits"] is False
