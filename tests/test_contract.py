"""The model-directory contract: the manifest refuses what the service could not serve safely, the reference
combination (mean, weighted mean, vote and its tie rule), signatures, and the mode registry."""

import numpy as np
import pytest
from pydantic import ValidationError

from ensemble_contract.combine import Combination, Rule, combine
from ensemble_contract.manifest import FileEntry, ImageSpec, ImageTask, Int8, Manifest, Member
from ensemble_contract.modes import MODES, Mode, ModeChoice, served_modes
from ensemble_contract.signature import Signature, TensorSpec, generated_inputs

FILE = FileEntry(path="members/a.onnx", sha256="0" * 64, size_bytes=1)
SIGNATURE = Signature(
    inputs=(TensorSpec(name="image", datatype="FP32", shape=(-1, 3, 8, 8)),),
    outputs=(
        TensorSpec(name="scores", datatype="FP32", shape=(-1, 2)),
        TensorSpec(name="scores_members", datatype="FP32", shape=(-1, 1, 2)),
    ),
)
IMAGE = ImageSpec(input="image", height=8, width=8, task=ImageTask.MULTILABEL, labels=("circle", "square"),
                  scores_output="scores")  # fmt: skip


def manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "shapes",
        "signature": SIGNATURE,
        "combine": (Combination(output="scores", rule=Rule.MEAN, stack_members=True),),
        "image": IMAGE,
        "members": (Member(name="a", file=FILE),),
        "ensemble": FILE,
        "int8": Int8(note="none"),
        "opset": 20,
        "versions": {},
    }
    return Manifest(**(fields | overrides))


def test_valid_manifest_round_trips_through_json() -> None:
    original = manifest()
    assert Manifest.model_validate_json(original.model_dump_json()) == original
    assert original.member_outputs == ("scores",)


@pytest.mark.parametrize(
    "overrides",
    [
        {"image": IMAGE.model_copy(update={"labels": ("circle", "circle")})},
        {"members": (Member(name="a", file=FILE), Member(name="a", file=FILE))},
        {"name": "../etc"},
        {"combine": (Combination(output="missing", rule=Rule.MEAN),)},
        {"image": IMAGE.model_copy(update={"input": "other"})},
        {"weights": (1.0, 2.0)},
    ],
)
def test_invalid_manifest_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Manifest.model_validate(manifest().model_dump() | overrides)


def test_image_spec_needs_the_outputs_of_its_task() -> None:
    with pytest.raises(ValidationError, match="needs scores_output"):
        ImageSpec(input="x", height=8, width=8, task=ImageTask.CLASSIFY)
    with pytest.raises(ValidationError, match="needs mask_output"):
        ImageSpec(input="x", height=8, width=8, task=ImageTask.SEGMENT)


def test_normalise_honours_layout_channel_order_and_scaling() -> None:
    pixels = np.zeros((1, 2, 2, 3), np.uint8)
    pixels[..., 0] = 255  # red
    nhwc_bgr = ImageSpec(input="x", height=2, width=2, layout="NHWC", channel_order="BGR", task="segment",
                         mask_output="m", mask_classes=("bg",))  # fmt: skip
    assert nhwc_bgr.normalise(pixels).shape == (1, 2, 2, 3)
    assert nhwc_bgr.normalise(pixels)[0, 0, 0].tolist() == [0.0, 0.0, 1.0]
    nchw = IMAGE.model_copy(update={"height": 2, "width": 2, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    assert nchw.normalise(pixels)[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert nchw.normalise(pixels, np.float16).dtype == np.float16


def test_logits_become_probabilities_by_task() -> None:
    logits = np.array([0.0, np.log(3.0)])
    classify = IMAGE.model_copy(update={"task": ImageTask.CLASSIFY, "scores": "logits"})
    assert classify.probabilities(logits) == pytest.approx([0.25, 0.75])
    multilabel = IMAGE.model_copy(update={"scores": "logits"})
    assert multilabel.probabilities(logits) == pytest.approx([0.5, 0.75])
    assert IMAGE.probabilities(np.array([0.2, 0.9])) == pytest.approx([0.2, 0.9])


def members(*rows: dict[str, list]) -> list[dict[str, np.ndarray]]:
    return [{name: np.asarray(value) for name, value in row.items()} for row in rows]


def test_mean_and_stacked_members() -> None:
    outputs = members({"p": [[1.0, 0.0]]}, {"p": [[0.0, 1.0]]}, {"p": [[0.5, 0.5]]})
    combined = combine(outputs, [Combination(output="p", rule=Rule.MEAN, stack_members=True)])
    assert combined["p"].tolist() == [[0.5, 0.5]]
    assert combined["p_members"].shape == (1, 3, 2)
    weighted = combine(outputs, [Combination(output="p", rule=Rule.MEAN)], weights=[2, 1, 1])
    assert weighted["p"] == pytest.approx(np.array([[0.625, 0.375]]))


def test_majority_vote_and_its_tie_rule() -> None:
    outputs = members({"label": [1, 2, 3, 7]}, {"label": [2, 2, 1, 7]}, {"label": [1, 0, 5, 7]})
    vote = [Combination(output="label", rule=Rule.VOTE)]
    assert combine(outputs, vote)["label"].tolist() == [1, 2, 1, 7]  # [3, 1, 5]: a three-way tie, smallest wins
    assert combine(outputs, vote, weights=[1, 1, 3])["label"].tolist() == [1, 0, 5, 7]


def test_weights_must_be_one_positive_per_member() -> None:
    with pytest.raises(ValueError, match="one positive, finite weight per member"):
        combine(members({"p": [1.0]}, {"p": [2.0]}), [Combination(output="p", rule=Rule.MEAN)], weights=[1, 0])


def test_generated_inputs_fit_their_signature() -> None:
    specs = (
        TensorSpec(name="x", datatype="FP16", shape=(-1, 3, -1)),
        TensorSpec(name="ids", datatype="INT64", shape=(-1, 4)),
        TensorSpec(name="mask", datatype="BOOL", shape=(2,)),
    )
    feeds = generated_inputs(specs, 5)
    assert {k: (v.dtype.name, v.shape) for k, v in feeds.items()} == {
        "x": ("float16", (5, 3, 32)),
        "ids": ("int64", (5, 4)),
        "mask": ("bool", (2,)),
    }
    assert all(spec.fits(feeds[spec.name].shape) for spec in specs)
    assert not specs[1].fits((5, 3))


def test_the_mode_registry_drives_the_api_enum_and_served_modes() -> None:
    assert [m.value for m in ModeChoice] == [*(m.value for m in MODES), "compare", "auto"]
    assert served_modes(manifest()) == (Mode.FUSED, Mode.SEQUENTIAL, Mode.PARALLEL)
    with_int8 = manifest(int8=Int8(file=FILE, note="kept"))
    assert served_modes(with_int8) == tuple(Mode)
