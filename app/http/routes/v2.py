"""The Open Inference Protocol (KServe v2) REST endpoints: translators between HTTP and the data plane, with the
protocol's encodings from app.v2.codec (which the gRPC front shares).

Inputs and outputs are the fused graph's, as the manifest's signature records them (the members' names, any of
the common datatypes, -1 for dynamic dims), as JSON or with the binary tensor data extension. Errors come back in
the protocol's shape, {"error": "message"}: the routes are ProtocolRoute's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Request, Response

from app.core.cost import json_parse_bytes
from app.errors import BadRequest
from app.http.deps import OPTIONAL_BEARER, ArrivalDep, Authorized, DataPlaneDep, Inference, LeaseDep, get_lease
from app.http.errors import ProtocolRoute, error_responses
from app.v2.codec import (
    BINARY_HEADER,
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    response_parameters,
    rest_request,
    rest_response,
    tensor_descriptions,
)
from app.v2.types import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)

BINARY_BODY_STATE = "binary_tensor_data"
UNKNOWN_MODEL = "Unknown model."


class TensorBody(ProtocolRoute):
    """Reads a tensor request's body and splits a binary-extension one: the route parses the JSON (the header) as
    usual, and finds the bytes after it in request.state.binary_tensor_data (b"" for plain JSON). Before the JSON is
    parsed, the memory it will take as Python objects is reserved on the request's lease: a JSON body too large
    for MAX_REQUEST_BYTES is refused with 413 before it is parsed."""

    async def prepare(self, request: Request) -> Request:
        declared = request.headers.get(BINARY_HEADER)
        body = await request.body()
        header, binary = body, b""
        if declared is not None:
            if not declared.isdigit() or int(declared) > len(body):
                raise BadRequest(f"{BINARY_HEADER} must be the JSON header's length, at most {len(body)}")
            header, binary = body[: int(declared)], body[int(declared) :]
        if header:  # GET requests under /v2 have none
            advice = "" if declared is not None else f"; send the tensors as binary data ({BINARY_HEADER})"
            (await get_lease(request)).reserve(json_parse_bytes(header), "its JSON, parsed", advice=advice)

        async def receive_header() -> dict[str, Any]:
            return {"type": "http.request", "body": header, "more_body": False}

        setattr(request.state, BINARY_BODY_STATE, binary)
        headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(header)).encode())]
        return OrjsonRequest(request.scope | {"headers": headers}, receive_header)


class OrjsonRequest(Request):
    """Parses its JSON with orjson, several times faster than the standard library on the long number arrays of
    tensor data (FastAPI's documented way to change how a route reads its body: a Request subclass). What orjson
    refuses goes to the standard library, which reads the same JSON the same way and also takes NaN and Infinity
    (Python's json writes them), so that those get the data plane's "not finite" answer."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._json = json.loads(body)
        return self._json


# The protocol's clients (tritonclient among them) send JSON without a Content-Type; there is no session or
# cookie here for a cross-site request to abuse, so parse JSON whatever the type.
router = APIRouter(
    prefix="/v2", tags=["Open Inference Protocol (v2)"], strict_content_type=False, route_class=TensorBody
)


@router.get("", summary="Server metadata", responses=error_responses(500, protocol=True))
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)


@router.get("/health/live", summary="Server liveness", responses=error_responses(500, protocol=True))
async def live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready", summary="Server readiness", responses=error_responses(500, 503, protocol=True))
async def ready(dataplane: DataPlaneDep, arrived: ArrivalDep) -> ServerReady:
    return ServerReady(ready=dataplane.server_ready(arrived))


@router.get(
    "/models/{model_name}",
    summary="Model metadata",
    responses=error_responses(404, 500, 503, protocol=True, s404=UNKNOWN_MODEL),
)
async def model_metadata(model_name: str, dataplane: DataPlaneDep, arrived: ArrivalDep) -> ModelMetadata:
    manifest = dataplane.manifest(model_name, arrived)
    inputs, outputs = tensor_descriptions(manifest)
    return ModelMetadata(
        name=manifest.name,
        platform=PLATFORM,
        inputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs],
        outputs=[TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in outputs],
    )


@router.get(
    "/models/{model_name}/ready",
    summary="Model readiness",
    responses=error_responses(404, 500, 503, protocol=True, s404=UNKNOWN_MODEL),
)
async def model_ready(model_name: str, dataplane: DataPlaneDep, arrived: ArrivalDep) -> ModelReady:
    with dataplane.using(arrived, model_name):  # not ready: 404 for another model, 503 for none (the protocol's way)
        return ModelReady(name=model_name, ready=True)


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
    arrived: ArrivalDep,
    lease: LeaseDep,
) -> Response:
    tensors = rest_request(model_name, body, getattr(request.state, BINARY_BODY_STATE))
    result = await dataplane.infer_tensors(tensors, arrived=arrived, front="http", lease=lease)
    header = {
        "model_name": result.model_name,
        "id": body.id or request.state.request_id,
        "parameters": response_parameters(result),
    }
    content, headers = rest_response(header, result.outputs, result.binary)
    return Response(content, headers=headers)
