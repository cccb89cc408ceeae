"""The build step end to end on the `test` preset, and fusion of members a user brings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import model_build
from ensemble_contract.manifest import Manifest, ManifestError, load_manifest, sha256_of
from model_build.build import _write_int8, build
from model_build.config import CLASS_PROBS, IMAGE_INPUT, MASK_PROBS, PRESETS, Int8Config
from model_build.directory import largest_loss
from model_build.evaluate import score_model
from model_build.shapes import LABELS, ShapesData, held_out_set

MEMBERS_CLASS_PROBS = CLASS_PROBS + "_members"


def run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {IMAGE_INPUT: images}), strict=True))


def assert_fused_is_mean_of_members(model_dir: Path, manifest: Manifest, images: np.ndarray) -> None:
    fused = run(model_dir / manifest.ensemble.path, images)
    members = [run(model_dir / m.file.path, images) for m in manifest.members]
    np.testing.assert_allclose(fused[CLASS_PROBS], np.mean([m[CLASS_PROBS] for m in members], axis=0), atol=1e-4)
    np.testing.assert_allclose(fused[MASK_PROBS], np.mean([m[MASK_PROBS] for m in members], axis=0), atol=1e-4)
    np.testing.assert_allclose(fused[MEMBERS_CLASS_PROBS], np.stack([m[CLASS_PROBS] for m in members], 1), atol=1e-4)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_build", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_manifest_describes_the_build(model_dir: Path, manifest: Manifest) -> None:
    config = PRESETS["test"]
    assert manifest.image.labels == LABELS
    assert manifest.image.height == manifest.image.width == config.training.image_size
    assert [m.width_scale for m in manifest.members] == [m.width_scale for m in config.members]
    assert all(m.parameters and m.parameters > 2_000_000 for m in manifest.members)
    assert all(m.metrics and m.metrics.images == config.test_images for m in manifest.members)
    assert manifest.ensemble_metrics is not None
    assert set(manifest.versions) == {"torch", "onnx", "onnxruntime"}
    assert [t.name for t in manifest.signature.inputs] == [IMAGE_INPUT]
    assert manifest.signature.output_names == (CLASS_PROBS, MEMBERS_CLASS_PROBS, MASK_PROBS)
    assert manifest.build_config == config.model_dump(mode="json")
    for entry in (*(m.file for m in manifest.members), manifest.ensemble):
        path = model_dir / entry.path
        assert sha256_of(path) == entry.sha256
        assert path.stat().st_size == entry.size_bytes
    onnx.checker.check_model(onnx.load(model_dir / manifest.ensemble.path), full_check=True)


def test_fused_graph_equals_mean_of_members(model_dir: Path, manifest: Manifest) -> None:
    size = manifest.image.height
    random_images = np.random.default_rng(7).normal(0, 1, (5, 3, size, size)).astype(np.float32)
    assert_fused_is_mean_of_members(model_dir, manifest, random_images)
    assert_fused_is_mean_of_members(model_dir, manifest, manifest.image.normalise(held_out_set(size, 16).images))


def test_outputs_are_probabilities(model_dir: Path, manifest: Manifest) -> None:
    size = manifest.image.height
    out = run(model_dir / manifest.ensemble.path, np.zeros((3, 3, size, size), np.float32))
    assert out[CLASS_PROBS].shape == (3, len(LABELS))
    assert out[MASK_PROBS].shape == (3, len(LABELS) + 1, size, size)
    assert out[MEMBERS_CLASS_PROBS].shape == (3, len(manifest.members), len(LABELS))
    np.testing.assert_allclose(out[MASK_PROBS].sum(axis=1), 1, atol=1e-5)
    assert ((out[CLASS_PROBS] >= 0) & (out[CLASS_PROBS] <= 1)).all()


def test_int8_graph_is_quantised_and_scored(model_dir: Path, manifest: Manifest) -> None:
    assert manifest.int8.file is not None
    path = model_dir / manifest.int8.file.path
    assert sha256_of(path) == manifest.int8.file.sha256
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert path.stat().st_size < manifest.ensemble.size_bytes / 3  # int8 weights
    # The manifest's scores are this file's and the fp32 graph's, on the same held-out set.
    test = held_out_set(manifest.image.height, PRESETS["test"].test_images)
    inputs = manifest.image.normalise(test.images)
    assert score_model(path, test, inputs).mean_label_accuracy == manifest.int8.metrics["int8_mean_label_accuracy"]
    assert manifest.int8.metrics["fp32_mean_label_accuracy"] == manifest.ensemble_metrics.mean_label_accuracy
    assert manifest.int8.note.startswith("kept")


def test_int8_can_be_turned_off(model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    out = tmp_path / "fp32"
    shutil.copytree(model_dir, out)  # members reused: only fusion, scoring and quantisation run again
    config = PRESETS["test"].model_copy(update={"int8": Int8Config(enabled=False)})
    rebuilt = build(config, out)
    assert rebuilt.int8.file is None and rebuilt.int8.note == "int8 turned off"
    assert not (out / manifest.int8.file.path).exists()
    assert rebuilt.ensemble_metrics == manifest.ensemble_metrics


def test_an_int8_graph_that_loses_too_much_is_not_shipped(model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    out = tmp_path / "strict"
    shutil.copytree(model_dir, out)
    test = held_out_set(manifest.image.height, 16)
    strict = Int8Config.model_construct(
        enabled=True, calibration_images=4, max_accuracy_loss=-1.0
    )  # any loss is too much
    config = PRESETS["test"].model_copy(update={"int8": strict})
    int8 = _write_int8(config, out, test, manifest.image.normalise(test.images), ShapesData())
    assert int8.file is None and int8.note.startswith("not kept")
    assert not (out / manifest.int8.file.path).exists()


def test_accuracy_loss_is_the_largest_drop_of_any_score() -> None:
    assert largest_loss({"a": 0.9, "b": 0.8}, {"a": 0.88, "b": 0.81}) == pytest.approx(0.02)
    assert largest_loss({"a": 0.9}, {"a": 0.92}) == pytest.approx(-0.02)


def test_same_config_gives_same_weights_and_rebuild_reuses(model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    again = tmp_path / "again"
    shutil.copytree(model_dir / "members", again / "members")
    (again / "members" / f"{manifest.members[1].name}.onnx").unlink()  # this one must be retrained
    rebuilt = build(PRESETS["test"], again)
    assert [m.file.sha256 for m in rebuilt.members] == [m.file.sha256 for m in manifest.members]
    assert rebuilt.ensemble.sha256 == manifest.ensemble.sha256
    assert rebuilt.int8.metrics == manifest.int8.metrics
    before = (again / "manifest.json").stat().st_mtime_ns
    assert build(PRESETS["test"], again) == rebuilt
    assert (again / "manifest.json").stat().st_mtime_ns == before


def test_members_do_not_depend_on_where_the_build_ran(model_dir: Path, manifest: Manifest) -> None:
    """The exporter's per-node stack traces name this checkout's absolute path: kept, a clone elsewhere would build
    the same weights into files with other sha256s."""
    checkout = str(Path(model_build.__file__).resolve().parent.parent).encode()
    for member in manifest.members:
        path = model_dir / member.file.path
        assert checkout not in path.read_bytes()
        assert not [node.name for node in onnx.load(path).graph.node if node.metadata_props]


def test_tampered_file_fails_verification(model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    member = copy / manifest.members[0].file.path
    member.write_bytes(member.read_bytes()[:-1] + b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(copy)


def test_our_members_fuse_without_image_options(model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    """Members built here describe their image preprocessing in their metadata."""
    files = [model_dir / m.file.path for m in manifest.members]
    result = run_cli("fuse", *files, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    fused = load_manifest(tmp_path / "out")
    assert fused.image == manifest.image
    assert fused.int8.file is None and "no calibration data" in fused.int8.note
    images = np.random.default_rng(1).normal(size=(4, 3, manifest.image.height, manifest.image.width))
    assert_fused_is_mean_of_members(tmp_path / "out", fused, images.astype(np.float32))


def test_cli_help_lists_both_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "build" in result.stdout and "fuse" in result.stdout
    assert json.dumps(sorted(PRESETS)) and "--preset" in run_cli("build", "--help").stdout
