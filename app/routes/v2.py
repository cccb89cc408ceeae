"""The Open Inference Protocol (KServe v2) REST endpoints, translated onto the shared data plane.

The input is the preprocessed tensor `image` (FP32 [N, 3, H, W]) as JSON; the outputs are the fused graph's
tensors. Errors come back as {"error": "message"} (see app.errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Body, Request, Response
from fastapi.routing import APIRoute

from app.dataplane import DataPlane
from app.deps import OPTIONAL_BEARER, ArrivalDep, Authorized, DataPlaneDep
from app.errors import BadRequest, ModelNotFound, error_responses
from app.manifest import CLASS_PROBS, INPUT_NAME, MASK_PROBS, MEMBER_CLASS_PROBS, Manifest
from app.modes import ModeChoice
from app.routes.v2_types import (
    FP32,
    InferenceRequest,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    OutputTensor,
    Ready,
    ServerMetadata,
    TensorMetadata,
)

BINARY_HEADER = "Inference-Header-Content-Length"


class JsonTensorsOnly(APIRoute):
    """Refuses the binary tensor extension with a clear message, before FastAPI fails to parse its body as JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_json_only(request: Request) -> Response:
            if BINARY_HEADER in request.headers:
                raise BadRequest(
                    "binary tensor data is not supported: send the elements as JSON data (tritonclient: "
                    "binary_data=False in InferInput.set_data_from_numpy and InferRequestedOutput)"
                )
            return await handle(request)

        return handle_json_only


# The protocol's clients (tritonclient among them) send JSON without a Content-Type; there is no session or
# cookie here for a cross-site request to abuse, so parse JSON whatever the type.
router = APIRouter(
    prefix="/v2", tags=["Open Inference Protocol (v2)"], strict_content_type=False, route_class=JsonTensorsOnly
)
SERVER_NAME = "onnx-ensemble-serving"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
UNKNOWN_MODEL = "Unknown model."


def output_shapes(manifest: Manifest) -> dict[str, list[int]]:
    """Each output's shape after the batch dimension."""
    spec, labels = manifest.input, len(manifest.labels)
    return {
        CLASS_PROBS: [labels],
        MASK_PROBS: [labels + 1, spec.height, spec.width],
        MEMBER_CLASS_PROBS: [len(manifest.members), labels],
    }


def served_model(dataplane: DataPlane, name: str) -> Manifest:
    if name != dataplane.manifest.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {dataplane.manifest.name!r}")
    return dataplane.manifest


def input_batch(request: InferenceRequest, manifest: Manifest) -> np.ndarray:
    """The request's `image` tensor as float32 [N, 3, H, W], or BadRequest saying what is wrong."""
    spec = manifest.input
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        raise BadRequest(f"expected exactly one input, named {INPUT_NAME!r}")
    tensor = request.inputs[0]
    if tensor.datatype != FP32:
        raise BadRequest(f"input {INPUT_NAME!r} must be {FP32}, got {tensor.datatype}")
    expected = [3, spec.height, spec.width]
    if len(tensor.shape) != 4 or tensor.shape[0] < 1 or tensor.shape[1:] != expected:
        raise BadRequest(
            f"input {INPUT_NAME!r} must have shape [N, {', '.join(map(str, expected))}], got {tensor.shape}"
        )
    try:
        array = np.asarray(tensor.data, dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(f"input {INPUT_NAME!r}: data must be numbers, flat or nested in row-major order") from None
    if array.size != math.prod(tensor.shape):
        raise BadRequest(
            f"input {INPUT_NAME!r}: shape {tensor.shape} needs {math.prod(tensor.shape)} elements, got {array.size}"
        )
    if not np.isfinite(array).all():
        raise BadRequest(f"input {INPUT_NAME!r}: data must be finite (no NaN or infinity)")
    return array.reshape(tensor.shape)


def requested_mode(request: InferenceRequest) -> ModeChoice | None:
    mode = (request.parameters or {}).get("mode")
    if mode is None:
        return None
    try:
        return ModeChoice(mode)
    except ValueError:
        raise BadRequest(f"parameter mode must be one of {[m.value for m in ModeChoice]}, got {mode!r}") from None


def requested_outputs(request: InferenceRequest) -> list[str]:
    names = [output.name for output in request.outputs or []] or [CLASS_PROBS, MASK_PROBS, MEMBER_CLASS_PROBS]
    unknown = sorted(set(names) - {CLASS_PROBS, MASK_PROBS, MEMBER_CLASS_PROBS})
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; the model has {CLASS_PROBS}, {MASK_PROBS}, {MEMBER_CLASS_PROBS}")
    return names


@router.get("", summary="Server metadata", responses=error_responses(500, protocol=True))
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION)


@router.get("/health/live", summary="Server liveness", responses=error_responses(500, protocol=True))
async def live() -> Live:
    return Live(live=True)


@router.get("/health/ready", summary="Server readiness", responses=error_responses(500, 503, protocol=True))
async def ready(dataplane: DataPlaneDep) -> Ready:
    return Ready(ready=dataplane.ready)


@router.get(
    "/models/{model_name}",
    summary="Model metadata",
    responses=error_responses(404, 500, 503, protocol=True, s404=UNKNOWN_MODEL),
)
async def model_metadata(model_name: str, dataplane: DataPlaneDep) -> ModelMetadata:
    manifest = served_model(dataplane, model_name)
    spec = manifest.input
    return ModelMetadata(
        name=manifest.name,
        platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype=FP32, shape=[-1, 3, spec.height, spec.width])],
        outputs=[
            TensorMetadata(name=name, datatype=FP32, shape=[-1, *shape])
            for name, shape in output_shapes(manifest).items()
        ],
    )


@router.get(
    "/models/{model_name}/ready",
    summary="Model readiness",
    responses=error_responses(404, 500, 503, protocol=True, s404=UNKNOWN_MODEL),
)
async def model_ready(model_name: str, dataplane: DataPlaneDep) -> ModelReady:
    return ModelReady(name=served_model(dataplane, model_name).name, ready=dataplane.ready)


@router.post(
    "/models/{model_name}/infer",
    summary="Inference on a preprocessed tensor",
    dependencies=[Authorized],
    openapi_extra=OPTIONAL_BEARER,
    responses=error_responses(400, 401, 404, 408, 413, 500, 503, 504, protocol=True, s404=UNKNOWN_MODEL),
)
async def infer(
    model_name: str,
    body: Annotated[InferenceRequest, Body()],
    request: Request,
    dataplane: DataPlaneDep,
    arrived: ArrivalDep,
) -> InferenceResponse:
    manifest = served_model(dataplane, model_name)
    batch = input_batch(body, manifest)
    names = requested_outputs(body)
    inference = await dataplane.infer_tensor(batch, mode=requested_mode(body), arrived=arrived)
    return InferenceResponse(
        model_name=manifest.name,
        id=body.id or request.state.request_id,
        parameters={"mode": inference.mode.value},
        outputs=[OutputTensor.of(name, getattr(inference.outputs, name)) for name in names],
    )
