"""Pictures in and out: an upload's media type, its header read and its pixels decoded within bounds, and a class
mask encoded. What a decoded picture becomes for the model is the contract's (ensemble_contract.picture), which
clients building /v2 tensors call too.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from ensemble_contract.picture import upright_rgb

# Pillow format names we decode, and the media types that announce them.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp")  # the documented ones
ACCEPTED_MEDIA_TYPES = frozenset({*MEDIA_TYPES, "image/jpg", "image/x-ms-bmp"})  # and aliases clients send

# Mask colours: background black, then well-separated colours (repeated if there are more classes).
_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
            (70, 240, 240), (245, 130, 48), (240, 50, 230), (210, 245, 60), (128, 128, 128))  # fmt: skip


def media_type(content_type: str | None) -> str:
    """'image/png' of 'Image/PNG; charset=...': the type alone, in lower case."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_media_type(content_type: str) -> None:
    """Refuses (415) a declared media type we do not decode."""
    declared = media_type(content_type)
    if declared not in ACCEPTED_MEDIA_TYPES:
        raise UnsupportedMediaType(
            f"unsupported media type {declared or '(none)'!r}: send a PNG, JPEG, WebP or BMP image as the body "
            "(Content-Type image/png, image/jpeg, image/webp or image/bmp) or as the multipart field 'file'"
        )


def open_image(data: bytes, *, max_pixels: int, target_size: tuple[int, int]) -> Image.Image:
    """The upload's header, read without decoding a pixel: PayloadTooLarge if it announces more than max_pixels,
    BadImage for anything Pillow cannot read. A JPEG is set to decode at a reduced scale where target_size allows
    (never below the model's input size), so the image's size is then what decoding will hold."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise BadImage("the body is not a PNG, JPEG, WebP or BMP image") from None
    except Image.DecompressionBombError:
        raise PayloadTooLarge(f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:  # a corrupt header can raise nearly anything inside a Pillow plugin
        raise BadImage(f"the image header cannot be read ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, more than {max_pixels} (MAX_IMAGE_PIXELS, by "
            "default proportionate to the model's input): send it smaller"
        )
    if image.format == "JPEG":
        side = max(target_size)  # either side may end up as the width once EXIF rotation is applied
        image.draft("RGB", (side, side))
    return image


def decode(image: Image.Image) -> Image.Image:
    """An opened image as an upright 8-bit RGB picture; BadImage if its pixel data cannot be decoded."""
    try:
        image.load()
        return upright_rgb(image)
    except Exception as exc:  # truncated or corrupt pixel data: the client's fault, never a 500
        raise BadImage(f"the image cannot be decoded ({type(exc).__name__}: {exc})") from None


def encode_mask_png(mask: np.ndarray, classes: int) -> bytes:
    """A class-index mask (uint8 [H, W]) as a palette PNG whose index i is mask class i."""
    height, width = mask.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    colours = [_PALETTE[0]] + [_PALETTE[1 + (i - 1) % (len(_PALETTE) - 1)] for i in range(1, classes)]
    image.putpalette([channel for colour in colours for channel in colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
