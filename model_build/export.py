"""Exports a trained member to ONNX: input `image`, outputs class (and mask) probabilities, dynamic batch axis."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from onnx_ir.passes.common import ClearMetadataAndDocStringPass

from model_build.config import CLASS_PROBS, IMAGE_INPUT, MASK_PROBS
from model_build.unet import Probabilities, UNet


def export_member(
    unet: UNet, path: Path, size: tuple[int, int], opset: int, metadata: dict[str, str], with_mask: bool = True
) -> None:
    """Writes the member to `path` as one self-contained ONNX file carrying `metadata` in its metadata_props."""
    model = Probabilities(unet, with_mask).eval()
    example = torch.zeros(2, 3, *size)
    # The exporter reports its progress on stdout and warns of optional packages; the build shows its own.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[IMAGE_INPUT],
            output_names=[CLASS_PROBS, MASK_PROBS] if with_mask else [CLASS_PROBS],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    # The exporter annotates every node with its Python stack trace, absolute paths of this checkout included:
    # cleared, the file's bytes (and sha256) depend on the weights only, not on where the build ran.
    ClearMetadataAndDocStringPass()(program.model)
    proto = program.model_proto
    proto.graph.name = path.stem
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
