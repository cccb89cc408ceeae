"""The manifest schema refuses what the service could not serve safely."""

import pytest
from pydantic import ValidationError

from app.manifest import FileEntry, InputSpec, Manifest, Member

FILE = FileEntry(path="members/a.onnx", sha256="0" * 64, size_bytes=1)


def manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "shapes",
        "labels": ("circle", "square"),
        "input": InputSpec(height=8, width=8),
        "members": (Member(name="a", file=FILE),),
        "ensemble": FILE,
        "opset": 20,
        "versions": {},
    }
    return Manifest(**(fields | overrides))


def test_valid_manifest_round_trips_through_json() -> None:
    original = manifest()
    assert Manifest.model_validate_json(original.model_dump_json()) == original
    assert original.mask_classes == ("background", "circle", "square")


@pytest.mark.parametrize(
    "overrides",
    [
        {"labels": ("circle", "circle")},
        {"members": (Member(name="a", file=FILE), Member(name="a", file=FILE))},
        {"name": "../etc"},
        {"labels": ()},
    ],
)
def test_invalid_manifest_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        manifest(**overrides)
