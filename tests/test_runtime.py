"""The fp32 modes compute the same ensemble, fused-int8 runs the int8 graph the build shipped; a broken model
directory stops start-up with a clear reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.core.model import runtime_options
from app.engine.cpu import threads_cpu_seconds
from app.engine.resources import usable_cores
from app.engine.runtime import EnsembleRuntime, ThreadPlan, session_threads
from app.errors import StartupError
from app.settings import Settings, Spinning
from ensemble_contract.manifest import FileEntry, Manifest, load_manifest
from ensemble_contract.modes import Mode
from ensemble_contract.signature import TensorSpec
from model_build.config import IMAGE_INPUT
from model_build.shapes import held_out_set
from tests.support import INT8_ATOL, copy_without_int8

TOLERANCE = 1e-4


def test_the_modes_agree(runtime: EnsembleRuntime, manifest: Manifest) -> None:
    spec = manifest.image
    batch = {IMAGE_INPUT: np.random.default_rng(0).normal(size=(3, 3, spec.height, spec.width)).astype(np.float32)}
    fused = runtime.infer(batch, Mode.FUSED)
    members, labels = len(manifest.members), len(manifest.image.labels)
    assert fused["class_probs"].shape == (3, labels)
    assert fused["mask_probs"].shape == (3, labels + 1, spec.height, spec.width)
    assert fused["class_probs_members"].shape == (3, members, labels)
    for mode in (Mode.SEQUENTIAL, Mode.PARALLEL):
        other = runtime.infer(batch, mode)
        assert list(other) == list(fused)
        for name, value in fused.items():
            np.testing.assert_allclose(other[name], value, atol=TOLERANCE, err_msg=name)


def test_fused_int8_runs_the_int8_graph_close_to_fp32(
    runtime: EnsembleRuntime, manifest: Manifest, model_dir: Path
) -> None:
    assert manifest.int8.file is not None
    assert runtime.modes == tuple(Mode)
    batch = {IMAGE_INPUT: manifest.image.normalise(held_out_set(manifest.image.height, 8).images)}
    int8 = runtime.infer(batch, Mode.FUSED_INT8)
    plain = ort.InferenceSession(model_dir / manifest.int8.file.path, providers=["CPUExecutionProvider"])
    names = list(manifest.signature.output_names)
    expected = dict(zip(names, plain.run(names, batch), strict=True))
    fused = runtime.infer(batch, Mode.FUSED)
    for name in names:
        np.testing.assert_allclose(int8[name], expected[name], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(int8[name], fused[name], atol=INT8_ATOL, err_msg=name)


def test_each_mode_has_its_thread_plan(runtime: EnsembleRuntime) -> None:
    options = runtime_options(Settings())
    members = len(runtime.manifest.members)
    for mode, plan in runtime.plans.items():
        assert plan.intra_op_threads == session_threads(options, mode, members)
        assert plan.spinning is Spinning.DURING_RUNS
        assert "spinning=during-runs" in plan.describe()


@pytest.mark.parametrize(
    ("spinning", "allowed", "stops_after_a_run"),
    [(Spinning.DURING_RUNS, "1", "1"), (Spinning.ALWAYS, "1", None), (Spinning.OFF, "0", None)],
)
def test_spinning_is_allowed_during_runs_and_stopped_after_them_by_default(
    spinning: Spinning, allowed: str, stops_after_a_run: str | None
) -> None:
    options = ThreadPlan(2, 1, spinning).session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allowed
    if stops_after_a_run is None:  # ONNX Runtime's default: pools spin on after a run
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry("session.force_spinning_stop")
    else:
        assert options.get_session_config_entry("session.force_spinning_stop") == stops_after_a_run


@pytest.fixture
def copy_of_models(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "models"))


def test_missing_manifest_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"no manifest\.json"):
        EnsembleRuntime.load(runtime_options(Settings(model_dir=tmp_path)))


def test_altered_member_is_a_startup_error(copy_of_models: Path) -> None:
    member = copy_of_models / load_manifest(copy_of_models).members[0].file.path
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(StartupError, match="does not match its sha256"):
        EnsembleRuntime.load(runtime_options(Settings(model_dir=copy_of_models)))


def test_unloadable_model_with_a_matching_checksum_is_a_startup_error(copy_of_models: Path) -> None:
    manifest = load_manifest(copy_of_models)
    fused = copy_of_models / manifest.ensemble.path
    fused.write_bytes(b"this is not an ONNX model")
    manifest.model_copy(update={"ensemble": FileEntry.of(copy_of_models, fused)}).write(copy_of_models)
    with pytest.raises(StartupError, match="ONNX Runtime cannot load"):
        EnsembleRuntime.load(runtime_options(Settings(model_dir=copy_of_models)))


def test_a_model_that_does_not_fit_the_manifest_is_a_startup_error(copy_of_models: Path) -> None:
    manifest = load_manifest(copy_of_models)
    outputs = [
        TensorSpec(name=o.name, datatype=o.datatype, shape=(*o.shape[:-1], o.shape[-1] + 1))
        if o.name == "class_probs"
        else o
        for o in manifest.signature.outputs
    ]
    signature = manifest.signature.model_copy(update={"outputs": tuple(outputs)})
    manifest.model_copy(update={"signature": signature}).write(copy_of_models)
    with pytest.raises(StartupError, match="class_probs"):
        EnsembleRuntime.load(runtime_options(Settings(model_dir=copy_of_models)))


def test_without_an_int8_graph_the_other_modes_are_served(model_dir: Path, tmp_path: Path) -> None:
    runtime = EnsembleRuntime.load(
        runtime_options(Settings(model_dir=copy_without_int8(model_dir, tmp_path / "fp32-only")))
    )
    try:
        assert runtime.modes == (Mode.FUSED, Mode.SEQUENTIAL, Mode.PARALLEL)
        assert set(runtime.plans) == set(runtime.modes)
    finally:
        runtime.close()


def test_slots_with_threads_get_sessions_of_their_own_and_pay_for_their_pools(model_dir: Path) -> None:
    """One slot on every core: the sessions' intra-op pools run the inference, and are charged to it. Two slots
    on one thread each: the slots share one set of sessions, each run on its caller's thread."""
    feeds = load_manifest(model_dir).example_inputs()
    cores = usable_cores().count
    for slots in (1, 2):
        runtime = EnsembleRuntime.load(runtime_options(Settings(model_dir=model_dir, inference_slots=slots)))
        try:
            threads = max(1, cores // slots)
            assert all(plan.intra_op_threads == threads for m, plan in runtime.plans.items() if m is not Mode.PARALLEL)
            for mode in runtime.modes:
                assert runtime.infer_measured(feeds, mode).timing.cpu_s > 0
            sets = {id(s) for s in runtime.session_sets}
            assert len(sets) == (1 if threads == 1 else slots)
            if threads > 1:
                assert all(s.pool_threads[Mode.FUSED] for s in runtime.session_sets)
                pools = runtime.session_sets[0].pool_threads[Mode.FUSED]
                big = load_manifest(model_dir).example_inputs(batch=32)  # work enough to be split over the pool
                before = threads_cpu_seconds(pools)
                charged = runtime.infer_measured(big, Mode.FUSED).timing.cpu_s
                pools_ran = threads_cpu_seconds(pools) - before
                assert pools_ran > 0 and charged >= pools_ran
        finally:
            runtime.close()
