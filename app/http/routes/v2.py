"""The Open Inference Protocol (KServe v2) REST endpoints, translated onto the shared data plane.

Inputs and outputs are the fused graph's, as the manifest's signature records them (the members' names, any of
the common datatypes, -1 for dynamic dims), as JSON or with the binary tensor data extension (app.http.routes.
v2_binary). Errors come back as {"error": "message"} (see app.errors).
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, Request, Response

from app.engine.model import LoadedModel
from app.errors import BadRequest, ModelNotFound, error_responses
from app.http.deps import OPTIONAL_BEARER, ArrivalDep, Authorized, DataPlaneDep, Inference, LeaseDep, ModelDep
from app.v2.codec import BINARY_BODY_STATE, BINARY_DATA_SIZE, BinaryInputs, BinaryTensors, infer_response
from app.v2.types import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    TensorMetadata,
)
from ensemble_contract.datatypes import NUMPY, is_floating
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import ModeChoice
from ensemble_contract.signature import TensorSpec

# The protocol's clients (tritonclient among them) send JSON without a Content-Type; there is no session or
# cookie here for a cross-site request to abuse, so parse JSON whatever the type.
router = APIRouter(
    prefix="/v2", tags=["Open Inference Protocol (v2)"], strict_content_type=False, route_class=BinaryTensors
)
SERVER_NAME = "onnx-ensemble-serving"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
UNKNOWN_MODEL = "Unknown model."
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def tensor_metadata(spec: TensorSpec) -> TensorMetadata:
    return TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape or []))


def served_model(model: LoadedModel, name: str) -> Manifest:
    if name != model.manifest.name:
        raise ModelNotFound(f"unknown model {name!r}; this server serves {model.manifest.name!r}")
    return model.manifest


def input_specs(request: InferenceRequest, manifest: Manifest) -> dict[str, TensorSpec]:
    """The signature's spec of each input, once the request's inputs are checked to be the model's, with datatypes
    and shapes that fit: everything a request's header says, checked before any of its data is converted."""
    expected = {spec.name: spec for spec in manifest.signature.inputs}
    given = [tensor.name for tensor in request.inputs]
    if sorted(given) != sorted(expected):
        raise BadRequest(f"expected inputs {sorted(expected)}, got {given}")
    for tensor in request.inputs:
        _check_header(tensor, expected[tensor.name])
    return expected


def input_feeds(request: InferenceRequest, specs: dict[str, TensorSpec], binary: BinaryInputs) -> dict[str, np.ndarray]:
    """The request's inputs as arrays by name (JSON data or binary tensor data, checked by input_specs), or
    BadRequest saying why; floating inputs must be finite whatever their encoding."""
    feeds = {}
    for tensor in request.inputs:
        spec = specs[tensor.name]
        size = (tensor.parameters or {}).get(BINARY_DATA_SIZE)
        array = _array(tensor, spec) if size is None else binary.take(tensor.name, size, tensor.shape, spec)
        if is_floating(spec.datatype) and not np.isfinite(array).all():
            raise BadRequest(
                f"input {tensor.name!r}: data must be finite (no NaN or infinity) and within {spec.datatype}'s range"
            )
        feeds[tensor.name] = array
    binary.check_all_taken()
    return feeds


def _check_header(tensor: InputTensor, spec: TensorSpec) -> None:
    """BadRequest unless the tensor's declared datatype and shape fit the signature."""
    name = repr(tensor.name)
    if tensor.datatype != spec.datatype:
        raise BadRequest(f"input {name} must be {spec.datatype}, got {tensor.datatype}")
    if any(d < 1 for d in tensor.shape):
        raise BadRequest(f"input {name}: every dimension must be at least 1, got {tensor.shape}")
    if not spec.fits(tensor.shape):
        raise BadRequest(f"input {name} must have shape {spec.dims} (-1: any size), got {tensor.shape}")


def _array(tensor: InputTensor, spec: TensorSpec) -> np.ndarray:
    """One JSON input tensor as an array of the signature's type, or BadRequest saying what is wrong with it."""
    name = repr(tensor.name)
    if tensor.data is None:
        raise BadRequest(f"input {name} has neither data nor parameters.{BINARY_DATA_SIZE}")
    try:
        raw = np.asarray(tensor.data)
    except ValueError:  # ragged nesting
        raise BadRequest(f"input {name}: data must be flat or nested in row-major order") from None
    if raw.size != math.prod(tensor.shape):
        raise BadRequest(f"input {name}: shape {tensor.shape} needs {math.prod(tensor.shape)} elements, got {raw.size}")
    dtype = NUMPY[spec.datatype]
    if dtype.kind == "b":
        _require(raw.dtype.kind == "b", name, "booleans")
        return raw.reshape(tensor.shape)
    if dtype.kind in "iu":
        if raw.dtype.kind not in "iu":  # past int64 (UINT64's upper half) numpy guesses float or object
            raw = np.asarray(tensor.data, dtype=object).ravel()
            _require(all(type(v) is int for v in raw), name, "integers")
        info = np.iinfo(dtype)
        if raw.size and (int(raw.min()) < info.min or int(raw.max()) > info.max):
            raise BadRequest(f"input {name}: values out of {spec.datatype}'s range [{info.min}, {info.max}]")
        return np.asarray(raw.tolist() if raw.dtype == object else raw, dtype=dtype).reshape(tensor.shape)
    if raw.dtype.kind == "O":  # integers past int64 among the numbers
        raw = np.asarray(tensor.data, dtype=object).ravel()
        _require(all(type(v) in (int, float) for v in raw), name, "numbers")
        raw = raw.astype(np.float64)
    _require(raw.dtype.kind in "iuf", name, "numbers")
    with np.errstate(over="ignore"):  # overflow becomes infinity: input_feeds refuses it, as any other encoding's
        return raw.astype(dtype).reshape(tensor.shape)


def _require(condition: bool, name: str, kind: str) -> None:
    if not condition:
        raise BadRequest(f"input {name}: data must be {kind}, flat or nested in row-major order")


def requested_mode(request: InferenceRequest) -> ModeChoice | None:
    mode = (request.parameters or {}).get("mode")
    if mode is None:
        return None
    try:
        return ModeChoice(mode)
    except ValueError:
        raise BadRequest(f"parameter mode must be one of {[m.value for m in ModeChoice]}, got {mode!r}") from None


def requested_outputs(request: InferenceRequest, manifest: Manifest) -> dict[str, bool]:
    """The outputs asked for (default: all), each with whether it goes as binary data."""
    known = manifest.signature.output_names
    all_binary = bool((request.parameters or {}).get("binary_data_output", False))
    asked = {o.name: bool((o.parameters or {}).get("binary_data", all_binary)) for o in request.outputs or []}
    unknown = sorted(set(asked) - set(known))
    if unknown:
        raise BadRequest(f"unknown outputs {unknown}; the model has {', '.join(known)}")
    return asked or dict.fromkeys(known, all_binary)


@router.get("", summary="Server metadata", responses=error_responses(500, protocol=True))
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)


@router.get("/health/live", summary="Server liveness", responses=error_responses(500, protocol=True))
async def live() -> Live:
    return Live(live=True)


@router.get("/health/ready", summary="Server readiness", responses=error_responses(500, 503, protocol=True))
async def ready(dataplane: DataPlaneDep) -> Ready:
    return Ready(ready=dataplane.ready and dataplane.model is not None)


@router.get(
    "/models/{model_name}",
    summary="Model metadata",
    responses=error_responses(404, 500, 503, protocol=True, s404=UNKNOWN_MODEL),
)
async def model_metadata(model_name: str, model: ModelDep) -> ModelMetadata:
    manifest = served_model(model, model_name)
    return ModelMetadata(
        name=manifest.name,
        platform=PLATFORM,
        inputs=[tensor_metadata(spec) for spec in manifest.signature.inputs],
        outputs=[tensor_metadata(spec) for spec in manifest.signature.outputs],
    )


@router.get(
    "/models/{model_name}/ready",
    summary="Model readiness",
    responses=error_responses(404, 500, 503, protocol=True, s404=UNKNOWN_MODEL),
)
async def model_ready(model_name: str, model: ModelDep, dataplane: DataPlaneDep) -> ModelReady:
    return ModelReady(name=served_model(model, model_name).name, ready=dataplane.ready)


@router.post(
    "/models/{model_name}/infer",
    summary="Inference on a preprocessed tensor",
    description="JSON tensors, or the binary tensor data extension (`Inference-Header-Content-Length`): inputs "
    "with `parameters.binary_data_size`, outputs as binary with `binary_data` (per output) or "
    "`binary_data_output` (per request).",
    response_model=InferenceResponse,
    response_model_exclude_none=True,
    dependencies=[Authorized, Inference],
    openapi_extra=OPTIONAL_BEARER,
    responses=error_responses(400, 401, 404, 408, 413, 500, 503, 504, protocol=True, s404=UNKNOWN_MODEL),
)
async def infer(
    model_name: str,
    body: Annotated[InferenceRequest, Body()],
    request: Request,
    dataplane: DataPlaneDep,
    model: ModelDep,
    arrived: ArrivalDep,
    lease: LeaseDep,
) -> Response:
    manifest = served_model(model, model_name)
    outputs = requested_outputs(body, manifest)
    specs = input_specs(body, manifest)
    dataplane.reserve_tensors(lease, model, {tensor.name: tensor.shape for tensor in body.inputs}, outputs)
    feeds = input_feeds(body, specs, BinaryInputs(getattr(request.state, BINARY_BODY_STATE, b"")))
    inference = await dataplane.infer_tensor(
        model, feeds, mode=requested_mode(body), arrived=arrived, protocol="http", lease=lease, outputs=outputs
    )
    header = {"model_name": manifest.name, "id": body.id or request.state.request_id}
    return infer_response(header | {"parameters": {"mode": inference.mode.value}}, inference.outputs, outputs)
