"""The Open Inference Protocol (KServe v2) REST endpoints: translators between HTTP and the data plane, with the
protocol's encodings from app.v2.codec (which the gRPC front shares).

Inputs and outputs are the fused graph's, as the manifest's signature records them (the members' names, any of
the common datatypes, -1 for dynamic dims), as JSON or with the binary tensor data extension. Errors come back in
the protocol's shape, {"error": "message"}: the routes are ProtocolRoute's.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.core.tensors import TensorInference
from app.errors import BadRequest
from app.http.deps import OPTIONAL_BEARER, AdmitsInference, ArrivalDep, Authorized, DataPlaneDep, LeaseDep, get_lease
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
from app.v2.decoding import DECODED_BYTES_PER_BODY_BYTE, decode_request, request_schema
from app.v2.types import (
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
)

HEADER_STATE, BINARY_BODY_STATE = "tensor_header", "binary_tensor_data"
UNKNOWN_MODEL = "Unknown model."
# The inference request's documented body: the route reads it itself, decoded by type (app.v2.decoding).
TENSOR_REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema()}}}}


class TensorBody(ProtocolRoute):
    """Reads a tensor request's body and splits a binary-extension one into its JSON header and the bytes after it
    (request.state.tensor_header and request.state.binary_tensor_data, b"" for plain JSON). Before the header is
    decoded, the most it can become in memory (app.v2.decoding) is reserved on the request's lease: a JSON body too
    large for MAX_REQUEST_BYTES is refused with 413 before any of it is decoded."""

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
            decoded = len(header) * DECODED_BYTES_PER_BODY_BYTE
            (await get_lease(request)).reserve(decoded, "its JSON, decoded", advice=advice)
        setattr(request.state, HEADER_STATE, header)
        setattr(request.state, BINARY_BODY_STATE, binary)
        return request


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
    dependencies=[Authorized, AdmitsInference],
    openapi_extra=OPTIONAL_BEARER | TENSOR_REQUEST_BODY,
    responses=error_responses(400, 401, 404, 408, 413, 500, 503, 504, protocol=True, s404=UNKNOWN_MODEL),
)
async def infer(
    model_name: str,
    request: Request,
    dataplane: DataPlaneDep,
    arrived: ArrivalDep,
    lease: LeaseDep,
) -> Response:
    body = decode_request(getattr(request.state, HEADER_STATE))
    tensors = rest_request(model_name, body, getattr(request.state, BINARY_BODY_STATE))
    result = await dataplane.infer(TensorInference(tensors), arrived=arrived, front="http", lease=lease)
    header = {
        "model_name": result.manifest.name,
        "id": body.id or request.state.request_id,
        "parameters": response_parameters(result),
    }
    content, headers = rest_response(header, result.answer.outputs, result.answer.binary)
    return Response(content, headers=headers)
