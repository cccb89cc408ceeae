"""A picture as an image model takes it, as the manifest's ImageSpec says: upright (EXIF orientation applied), 8-bit
RGB (16-bit grey scaled to 8 bits, transparent pixels composited on white: the synthetic training images have no
alpha), stretched to width x height (bilinear), then ImageSpec.normalise, the function the build trains and scores
with. POST /predict does this to an upload (app.core.imaging bounds and decodes it first); a client building a /v2
tensor calls `image_tensor` and sends exactly what /predict would have run.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ensemble_contract.manifest import ImageSpec, load_manifest

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def upright_rgb(image: Image.Image) -> Image.Image:
    """A decoded picture, upright and in 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:  # Pillow's own conversion would clip at 255, not scale
        scaled = np.asarray(image, dtype=np.float32) / 257
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def stretched(image: Image.Image, height: int, width: int) -> np.ndarray:
    """An upright RGB picture resized to height x width (bilinear, the aspect ratio not kept), as uint8 pixels."""
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def input_batch(image: Image.Image, spec: ImageSpec, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """An upright RGB picture as the model's input batch of one, in the spec's layout, as `dtype`."""
    return spec.normalise(stretched(image, spec.height, spec.width)[np.newaxis], dtype)


def image_tensor(model_dir: Path, picture: Path | bytes) -> np.ndarray:
    """The image input of a /v2 request for one picture (a file, or its bytes), preprocessed as the model
    directory's manifest says: the batch of one that POST /predict would run."""
    manifest = load_manifest(model_dir, verify_files=False)
    if manifest.image is None:
        raise ValueError(f"{model_dir} holds no image model: its inputs are tensors, sent as they are")
    spec, tensor = manifest.image, manifest.signature.input(manifest.image.input)
    assert tensor is not None  # the manifest's validator checks it
    with Image.open(io.BytesIO(picture) if isinstance(picture, bytes) else picture) as image:
        return input_batch(upright_rgb(image), spec, tensor.dtype)
