"""POST /predict on a real server with the test models: inputs, options, modes, headers and every error."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.imaging import decode, open_image
from bench.service import encode, picture, png_bytes
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode
from ensemble_contract.picture import input_batch
from tests.support import INT8_ATOL, LiveServer, infer_json, png_header_only

TOLERANCE = 1e-4


def predict(client: httpx.Client, data: bytes, content_type: str = "image/png", **params: str) -> httpx.Response:
    return client.post("/predict", content=data, headers={"Content-Type": content_type}, params=params)


@pytest.mark.parametrize(
    ("format", "content_type", "mode"),
    [
        ("PNG", "image/png", "RGBA"),
        ("JPEG", "image/jpeg", "L"),
        ("WEBP", "image/webp", "RGB"),
        ("BMP", "image/bmp", "P"),
    ],
)
def test_multipart_upload_of_each_format(
    client: httpx.Client, manifest: Manifest, format: str, content_type: str, mode: str
) -> None:
    data = encode(picture(70, 30, mode), format)
    response = client.post("/predict", files={"file": (f"x.{format.lower()}", data, content_type)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": manifest.name, "sha256": manifest.ensemble.sha256, "task": "multilabel"}
    assert body["mode"] == "fused"
    assert [label["name"] for label in body["labels"]] == list(manifest.image.labels)
    for label in body["labels"]:
        assert 0 <= label["probability"] <= 1
        assert label["present"] == (label["probability"] >= body["threshold"] == 0.5)
    assert body["members"] is None
    assert body["mask"] is None
    assert set(body["timings_ms"]) == {*TIMES, "batch_rows"}
    assert body["timings_ms"]["cpu"] > 0 and body["timings_ms"]["batch_rows"] == 1  # it came alone


TIMES = ("decode", "preprocess", "queue", "batch_wait", "inference", "total", "cpu")


def test_raw_body_and_headers(client: httpx.Client) -> None:
    response = predict(client, png_bytes())
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == response.json()["request_id"]
    *durations, batch = (part.strip() for part in response.headers["Server-Timing"].split(","))
    timing = {name: float(ms) for name, ms in (part.split(";dur=") for part in durations)}
    assert set(timing) == set(TIMES) and batch == "batch_rows;desc=1"
    # The header says what the body says (to the header's microsecond), and the stages are parts of the total.
    body_timings = response.json()["timings_ms"]
    assert timing == pytest.approx({name: body_timings[name] for name in TIMES}, abs=0.0005)
    stages = timing["decode"] + timing["preprocess"] + timing["queue"] + timing["inference"]
    assert timing["inference"] > 0 and stages <= timing["total"] + 4 * 0.0005


def test_multipart_part_without_a_precise_type_is_sniffed(client: httpx.Client) -> None:
    response = client.post("/predict", files={"file": ("x.bin", png_bytes(), "application/octet-stream")})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("given", "echoed"),
    [("trace-42.a:b", True), ("has spaces", False), ("x" * 200, False), ("<script>", False)],
)
def test_request_id_is_echoed_only_when_sane(client: httpx.Client, given: str, echoed: bool) -> None:
    response = client.post(
        "/predict", content=png_bytes(), headers={"Content-Type": "image/png", "X-Request-ID": given}
    )
    assert (response.headers["X-Request-ID"] == given) is echoed
    assert response.json()["request_id"] == response.headers["X-Request-ID"]


def test_the_modes_agree_and_the_members_average_to_the_ensemble(client: httpx.Client) -> None:
    results = {}
    for mode in Mode:
        response = predict(client, png_bytes(seed=3), mode=mode.value, members="true")
        assert response.status_code == 200
        assert response.json()["mode"] == mode
        results[mode] = response.json()
    fused = [label["probability"] for label in results[Mode.FUSED]["labels"]]
    for mode in (Mode.SEQUENTIAL, Mode.PARALLEL, Mode.FUSED_INT8):
        atol = INT8_ATOL if mode is Mode.FUSED_INT8 else TOLERANCE
        np.testing.assert_allclose([label["probability"] for label in results[mode]["labels"]], fused, atol=atol)
    members = results[Mode.FUSED]["members"]
    mean = np.mean([list(member["probabilities"].values()) for member in members], axis=0)
    np.testing.assert_allclose(mean, fused, atol=TOLERANCE)


def test_compare_rotates_over_the_modes(client: httpx.Client) -> None:
    modes = {predict(client, png_bytes(), mode="compare").json()["mode"] for _ in range(len(Mode))}
    assert modes == {mode.value for mode in Mode}


def test_mask_is_the_argmax_of_the_mask_probabilities(client: httpx.Client, manifest: Manifest) -> None:
    data = png_bytes(seed=5)
    response = predict(client, data, mask="true", mode="sequential")
    mask = response.json()["mask"]
    spec = manifest.image
    assert (mask["width"], mask["height"]) == (spec.width, spec.height)
    assert mask["classes"] == ["background", *manifest.image.labels]
    png = Image.open(io.BytesIO(base64.b64decode(mask["png_base64"])))
    assert (png.format, png.mode, png.size) == ("PNG", "P", (spec.width, spec.height))
    # The same picture through the protocol that takes tensors: one preprocessing, one model, one answer.
    batch = input_batch(decode(open_image(data, max_pixels=10**6, target_size=(spec.width, spec.height))), spec)
    outputs = infer_json(client, manifest.name, batch, outputs=["mask_probs"])
    mask_probs = np.asarray(outputs["mask_probs"]["data"], dtype=np.float32).reshape(outputs["mask_probs"]["shape"])
    np.testing.assert_array_equal(np.asarray(png), mask_probs[0].argmax(axis=0))


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"definitely not an image", "image/png", 400, "bad_image"),
        (b"", "image/jpeg", 400, "bad_image"),
        (png_bytes()[:80], "image/png", 400, "bad_image"),
        (encode(picture(), "GIF"), "image/gif", 415, "unsupported_media_type"),
        (png_bytes(), "text/plain", 415, "unsupported_media_type"),
        (png_bytes(), "application/octet-stream", 415, "unsupported_media_type"),
    ],
    ids=["text", "empty", "truncated", "gif", "text-plain", "octet-stream"],
)
def test_bad_bodies(client: httpx.Client, data: bytes, content_type: str, status: int, code: str) -> None:
    assert_error(predict(client, data, content_type), status, code)


def test_decompression_bomb_is_413(client: httpx.Client) -> None:
    assert_error(predict(client, png_header_only(30_000, 30_000)), 413, "payload_too_large")


def test_too_many_bytes_is_413_declared_or_streamed(client: httpx.Client, server: LiveServer) -> None:
    limit = server.service.settings.max_upload_bytes
    too_big = b"\0" * (limit + 1)
    assert_error(predict(client, too_big), 413, "payload_too_large")
    chunked = client.post(
        "/predict",
        content=(too_big[i : i + 2**20] for i in range(0, len(too_big), 2**20)),
        headers={"Content-Type": "image/png"},
    )
    assert_error(chunked, 413, "payload_too_large")


def test_unsupported_part_type_is_415(client: httpx.Client) -> None:
    response = client.post("/predict", files={"file": ("x.gif", encode(picture(), "GIF"), "image/gif")})
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("params", [{"mode": "fastest"}, {"members": "perhaps"}, {"mask": "2"}])
def test_bad_parameters_are_422_in_our_shape(client: httpx.Client, params: dict[str, str]) -> None:
    response = predict(client, png_bytes(), **params)
    assert_error(response, 422, "invalid_parameter")
    assert next(iter(params)) in response.json()["error"]["message"]


def test_multipart_without_the_file_field_is_422(client: httpx.Client) -> None:
    response = client.post("/predict", files={"image": ("x.png", png_bytes(), "image/png")})
    assert_error(response, 422, "invalid_parameter")


def test_unknown_route_and_wrong_method_in_our_shape(client: httpx.Client) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")
