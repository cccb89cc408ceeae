"""The Open Inference Protocol over gRPC (GRPC_PORT), translated onto the same data plane as the REST endpoints.

The service and its messages are the protocol's `inference.GRPCInferenceService`, with the generated code that
tritonclient ships (Triton's superset of the KServe v2 .proto; the methods a v2 client calls are the same).
A request is turned into the REST request's model and checked by the same functions (app.http.routes.v2): inputs
as `raw_input_contents` (what tritonclient sends) or typed `contents`; outputs always as `raw_output_contents`.
Errors carry the status code of the REST error's HTTP status (400: INVALID_ARGUMENT, 503: UNAVAILABLE, ...).
A grpc.aio server on the main server's event loop, started and stopped by the app's lifespan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.core.cost import BODY_COPIES
from app.core.dataplane import DataPlane
from app.core.memory import Lease
from app.core.repository import ModelRepository, ModelState
from app.errors import BadRequest, NotReady, ServiceError, StartupError, Unauthorized
from app.http.deps import bearer_token, verify_api_key
from app.http.routes.v2 import (
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    input_feeds,
    input_specs,
    requested_mode,
    requested_outputs,
    served_model,
)
from app.observability.metrics import Metrics
from app.settings import Settings
from app.v2.codec import BINARY_DATA_SIZE, BinaryInputs, little_endian_bytes
from app.v2.types import InferenceRequest, InputTensor, RequestedOutput
from ensemble_contract.datatypes import of_numpy
from ensemble_contract.signature import TensorSpec

logger = logging.getLogger("app")
Context = grpc.aio.ServicerContext
SERVICE_PREFIX = "/inference.GRPCInferenceService/"
NEEDS_API_KEY = frozenset({"ModelInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The typed field of InferTensorContents that carries each datatype (FP16 has none: raw contents only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _parameters(parameters: Any) -> dict[str, Any]:
    """A protocol parameter map (name -> InferParameter) as plain values."""
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in parameters.items()}


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape or []))


def inference_request(request: pb.ModelInferRequest) -> tuple[InferenceRequest, BinaryInputs]:
    """The gRPC request as the REST request's model, and its raw contents as the binary extension's bytes."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        common = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        if raw:
            inputs.append(InputTensor(**common, parameters={BINARY_DATA_SIZE: len(raw[i])}))
            continue
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is None:
            raise BadRequest(f"input {tensor.name!r}: {tensor.datatype} goes in raw_input_contents")
        inputs.append(InputTensor(**common, data=list(getattr(tensor.contents, field))))
    if not inputs:
        raise BadRequest("the request has no inputs")
    parsed = InferenceRequest(
        id=request.id or None,
        parameters=_parameters(request.parameters),
        inputs=inputs,
        outputs=[RequestedOutput(name=o.name) for o in request.outputs] or None,
    )
    return parsed, BinaryInputs(b"".join(raw))


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC a v2 client needs, and the model repository's; the others answer UNIMPLEMENTED (the generated
    base class). Method names are the protocol's."""

    def __init__(self, settings: Settings, dataplane: DataPlane, repository: ModelRepository) -> None:
        self.settings = settings
        self.dataplane = dataplane
        self.repository = repository

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        async with self._rpc("ServerLive", context):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        async with self._rpc("ServerReady", context):
            return pb.ServerReadyResponse(ready=self.dataplane.ready and self.dataplane.model is not None)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        async with self._rpc("ServerMetadata", context):
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        async with self._rpc("ModelReady", context):
            model = self.dataplane.model
            served = model is not None and model.manifest.name == request.name
            return pb.ModelReadyResponse(ready=served and self.dataplane.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        async with self._rpc("ModelMetadata", context):
            with self.dataplane.using() as model:
                manifest = served_model(model, request.name)
            return pb.ModelMetadataResponse(
                name=manifest.name,
                platform=PLATFORM,
                inputs=[_tensor_metadata(spec) for spec in manifest.signature.inputs],
                outputs=[_tensor_metadata(spec) for spec in manifest.signature.outputs],
            )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        lease = self.dataplane.memory.lease()
        try:
            return await self._infer(request, context, lease)
        finally:
            lease.release()

    async def _infer(self, request: pb.ModelInferRequest, context: Context, lease: Lease) -> pb.ModelInferResponse:
        arrived = time.perf_counter()
        async with self._rpc("ModelInfer", context):
            if not self.dataplane.serves(arrived):
                raise NotReady("the server is shutting down")
            lease.reserve(request.ByteSize() * BODY_COPIES, "the request message")
            with self.dataplane.using() as model:
                manifest = served_model(model, request.model_name)
                parsed, binary = inference_request(request)
                outputs = dict.fromkeys(requested_outputs(parsed, manifest), True)  # raw_output_contents
                specs = input_specs(parsed, manifest)
                self.dataplane.reserve_tensors(lease, model, {t.name: t.shape for t in parsed.inputs}, outputs)
                feeds = input_feeds(parsed, specs, binary)
                inference = await self.dataplane.infer_tensor(
                    model,
                    feeds,
                    mode=requested_mode(parsed),
                    arrived=arrived,
                    protocol="grpc",
                    lease=lease,
                    outputs=outputs,
                )
            arrays = {name: inference.outputs[name] for name in outputs}
            return pb.ModelInferResponse(
                model_name=manifest.name,
                id=request.id,
                parameters={"mode": pb.InferParameter(string_param=inference.mode.value)},
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(name=name, datatype=of_numpy(a.dtype), shape=list(a.shape))
                    for name, a in arrays.items()
                ],
                raw_output_contents=[little_endian_bytes(a) for a in arrays.values()],
            )

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        async with self._rpc("RepositoryIndex", context):
            entries = [e for e in await self.repository.index() if e.state is ModelState.READY or not request.ready]
            return pb.RepositoryIndexResponse(
                models=[
                    pb.RepositoryIndexResponse.ModelIndex(name=e.name, state=e.state, reason=e.reason) for e in entries
                ]
            )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        async with self._rpc("RepositoryModelLoad", context):
            await self.repository.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        async with self._rpc("RepositoryModelUnload", context):
            await self.repository.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

    @asynccontextmanager
    async def _rpc(self, method: str, context: Context) -> AsyncIterator[None]:
        """Turns an error into its status code and message (and Retry-After into trailing metadata), and counts
        the call by method and code."""
        code, message = grpc.StatusCode.OK, ""
        try:
            yield
        except ServiceError as exc:
            code, message = STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message
            if code is grpc.StatusCode.INTERNAL:
                logger.error("gRPC %s failed: %s", method, message, exc_info=exc.__cause__ or exc)
            if "Retry-After" in (exc.headers or {}):
                context.set_trailing_metadata((("retry-after", exc.headers["Retry-After"]),))
        except Exception:
            code, message = grpc.StatusCode.INTERNAL, "internal error; the server's log has the details"
            logger.exception("gRPC %s failed", method)
        finally:
            self.dataplane.metrics.grpc_requests.labels(method, code.name).inc()
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)

class Authentication(grpc.aio.ServerInterceptor):
    """With API_KEY set, checks the `authorization: Bearer <key>` metadata of the calls that need it before their
    message is deserialized: a wrong key costs no more than UNAUTHENTICATED."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method.removeprefix(SERVICE_PREFIX)
        if self.settings.api_key is not None and method in NEEDS_API_KEY:
            metadata = dict(details.invocation_metadata or ())
            try:
                verify_api_key(self.settings, bearer_token(str(metadata.get("authorization", ""))))
            except Unauthorized as refused:
                self.metrics.grpc_requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
                return _aborting(grpc.StatusCode.UNAUTHENTICATED, refused.message)
        return await continuation(details)


def _aborting(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call; with no deserializer, its message stays the bytes it arrived as."""

    async def abort(request: bytes, context: Context) -> None:
        await context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class GrpcServer:
    def __init__(self, settings: Settings, dataplane: DataPlane, repository: ModelRepository) -> None:
        assert settings.grpc_port is not None
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.address = f"{host}:{settings.grpc_port}"
        self._server = grpc.aio.server(
            interceptors=[Authentication(settings, dataplane.metrics)],
            options=[("grpc.max_receive_message_length", settings.max_upload_bytes), ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=settings.max_concurrency,
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(settings, dataplane, repository), self._server
        )

    async def start(self) -> None:
        """Listens on HOST:GRPC_PORT; StartupError if that address cannot be had."""
        try:
            bound = self._server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on GRPC_PORT ({self.address}): {exc}") from None
        if bound == 0:
            raise StartupError(f"cannot listen on GRPC_PORT ({self.address})")
        await self._server.start()

    async def stop(self, grace_s: float) -> None:
        """Refuses new calls at once; calls in flight get grace_s to finish."""
        await self._server.stop(grace_s)
