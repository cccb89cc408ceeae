"""Decoding accepts every supported kind of picture, refuses the rest with the right error, and
preprocessing follows the manifest's contract."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.core.imaging import check_media_type, decode, encode_mask_png, open_image
from app.errors import BadImage, PayloadTooLarge, ServiceError, UnsupportedMediaType
from bench.service import encode, picture
from ensemble_contract.manifest import ImageSpec, ImageTask
from ensemble_contract.picture import input_batch
from tests.support import png_header_only

TARGET = (32, 32)
MAX_PIXELS = 1_000_000
SPEC = ImageSpec(
    input="image",
    height=24,
    width=32,
    mean=(0.1, 0.2, 0.3),
    std=(0.5, 0.25, 0.125),
    scale=1 / 255,
    task=ImageTask.MULTILABEL,
    labels=("a",),
    scores_output="scores",
)


def decoded(data: bytes) -> Image.Image:
    return decode(open_image(data, max_pixels=MAX_PIXELS, target_size=TARGET))


@pytest.mark.parametrize(
    ("format", "mode"),
    [(f, m) for f in ("PNG", "WEBP", "BMP") for m in ("RGB", "L", "RGBA", "P", "1")]
    + [("PNG", "LA"), ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK")],
)
def test_supported_formats_and_modes_decode_to_rgb(format: str, mode: str) -> None:
    image = decoded(encode(picture(50, 30, mode), format))
    assert image.mode == "RGB"
    assert image.size == (50, 30)


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decoded(encode(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = decoded(encode(Image.fromarray(levels), "PNG"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_exif_orientation_is_applied() -> None:
    upright = picture(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    image = decoded(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (40, 20)


@pytest.mark.parametrize("format", ["PNG", "WEBP"])
def test_an_animated_image_is_read_as_its_first_frame(format: str) -> None:
    red, blue = Image.new("RGB", (20, 10), (255, 0, 0)), Image.new("RGB", (20, 10), (0, 0, 255))
    data = encode(red, format, save_all=True, append_images=[blue], duration=100, loop=0, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    image = decoded(data)
    assert image.size == (20, 10)
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_a_large_jpeg_decodes_at_reduced_scale_but_not_below_the_model_size() -> None:
    image = decoded(encode(picture(800, 600), "JPEG"))
    assert min(image.size) >= max(TARGET)
    assert image.size[0] < 800


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", encode(picture(), "PNG")[:60], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "text", "truncated-png", "png-signature-only"],
)
def test_undecodable_bodies_are_bad_images(data: bytes) -> None:
    with pytest.raises(BadImage):
        decoded(data)


def test_unsupported_formats_are_bad_images_not_guessed() -> None:
    with pytest.raises(BadImage):
        decoded(encode(picture(), "GIF"))


@pytest.mark.parametrize("side", [2_000, 30_000], ids=["over-our-limit", "over-pillows-limit"])
def test_too_many_pixels_are_refused_before_decoding(side: int) -> None:
    with pytest.raises(PayloadTooLarge):
        decoded(png_header_only(side, side))


@pytest.mark.parametrize("content_type", ["image/png", "IMAGE/JPEG; charset=binary", "image/webp", "image/bmp"])
def test_supported_media_types_pass(content_type: str) -> None:
    check_media_type(content_type)


@pytest.mark.parametrize("content_type", ["", "text/plain", "image/gif", "application/json", "image/tiff"])
def test_other_media_types_are_unsupported(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_media_type(content_type)


def test_preprocess_follows_the_manifest_contract() -> None:
    image = Image.new("RGB", (64, 48), (255, 51, 0))
    batch = input_batch(image, SPEC)
    assert batch.shape == (1, 3, 24, 32)
    assert batch.dtype == np.float32
    assert batch.flags.c_contiguous
    expected = [(1.0 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0.0 - 0.3) / 0.125]
    np.testing.assert_allclose(batch[0, :, 5, 7], expected, rtol=1e-6, atol=1e-6)


def test_preprocess_stretches_any_aspect_ratio() -> None:
    left_red_right_blue = Image.new("RGB", (200, 10), (0, 0, 255))
    left_red_right_blue.paste((255, 0, 0), (0, 0, 100, 10))
    batch = input_batch(
        left_red_right_blue, SPEC.model_copy(update={"height": 8, "width": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    )
    assert batch[0, 0, :, 0].min() > 0.9  # left column red
    assert batch[0, 2, :, -1].min() > 0.9  # right column blue


def test_mask_png_keeps_class_indices_and_palette() -> None:
    mask = np.arange(5, dtype=np.uint8).repeat(4).reshape(4, 5)
    png = Image.open(io.BytesIO(encode_mask_png(mask, classes=5)))
    assert png.mode == "P"
    assert png.format == "PNG"
    np.testing.assert_array_equal(np.asarray(png), mask)
    palette = png.getpalette()
    assert palette is not None
    assert palette[:3] == [0, 0, 0]
    colours = {tuple(palette[i * 3 : i * 3 + 3]) for i in range(5)}
    assert len(colours) == 5


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_unexpected_errors(data: bytes) -> None:
    try:
        image = decoded(data)
    except ServiceError as exc:
        assert exc.status in (400, 413)
    else:
        assert image.mode == "RGB"


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["PNG", "JPEG", "WEBP", "BMP"]),
    st.integers(1, 300),
    st.integers(1, 300),
    st.sampled_from(["RGB", "L"]),
    st.integers(0, 64),
)
def test_any_size_and_aspect_gives_the_model_shape(format: str, width: int, height: int, mode: str, cut: int) -> None:
    data = encode(picture(width, height, mode), format)
    try:
        image = decoded(data[: len(data) - cut] if cut else data)
    except BadImage:
        assert cut  # only a truncated file may fail
        return
    batch = input_batch(image, SPEC)
    assert batch.shape == (1, 3, SPEC.height, SPEC.width)
    assert np.isfinite(batch).all()
