"""The Open Inference Protocol over gRPC (GRPC_PORT): a translator between protobuf and the data plane, with the
protocol's encodings from app.v2.codec (which the REST front shares); it imports nothing of the HTTP front.

The service and its messages are the protocol's `inference.GRPCInferenceService`, with the generated code that
tritonclient ships (Triton's superset of the KServe v2 .proto; the methods a v2 client calls are the same).
Errors carry the status code of their HTTP twin (400: INVALID_ARGUMENT, 503: UNAVAILABLE, ...), so both fronts
answer the same questions the same way. A grpc.aio server on the main server's event loop, started and stopped
by the app's lifespan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from app.core.auth import verify_api_key
from app.core.cost import BODY_COPIES
from app.core.repository import ModelState
from app.core.service import Service
from app.errors import NotReady, ServiceError, StartupError, Unauthorized
from app.observability.metrics import ServiceMetrics
from app.settings import Settings
from app.v2.codec import (
    EXTENSIONS,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    TensorDescription,
    grpc_request,
    grpc_response,
    tensor_descriptions,
)

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


def _tensor_metadata(tensor: TensorDescription) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC a v2 client needs, and the model repository's; the others answer UNIMPLEMENTED (the generated
    base class). Method names are the protocol's."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        async with self._rpc("ServerLive", context):
            return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        arrived = time.perf_counter()
        async with self._rpc("ServerReady", context):
            try:
                ready = self.service.serving().server_ready(arrived)
            except NotReady:  # loading, or draining: the protocol's answer is the flag
                ready = False
            return pb.ServerReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        async with self._rpc("ServerMetadata", context):
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        arrived = time.perf_counter()
        async with self._rpc("ModelReady", context):
            dataplane = self.service.dataplane
            return pb.ModelReadyResponse(ready=dataplane is not None and dataplane.model_ready(request.name, arrived))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        arrived = time.perf_counter()
        async with self._rpc("ModelMetadata", context):
            manifest = self.service.serving().manifest(request.name, arrived)
            inputs, outputs = tensor_descriptions(manifest)
            return pb.ModelMetadataResponse(
                name=manifest.name,
                platform=PLATFORM,
                inputs=[_tensor_metadata(tensor) for tensor in inputs],
                outputs=[_tensor_metadata(tensor) for tensor in outputs],
            )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        arrived = time.perf_counter()
        async with self._rpc("ModelInfer", context):
            dataplane = self.service.serving()
            lease = dataplane.memory.lease()
            try:
                lease.reserve(request.ByteSize() * BODY_COPIES, "the request message")
                tensors = grpc_request(request)
                result = await dataplane.infer_tensors(tensors, arrived=arrived, front="grpc", lease=lease)
            finally:
                lease.release()
            return grpc_response(result, request.id)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        async with self._rpc("RepositoryIndex", context):
            listed = await self.service.models().index()
            entries = [e for e in listed if e.state is ModelState.READY or not request.ready]
            return pb.RepositoryIndexResponse(
                models=[
                    pb.RepositoryIndexResponse.ModelIndex(name=e.name, state=e.state, reason=e.reason) for e in entries
                ]
            )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        async with self._rpc("RepositoryModelLoad", context):
            await self.service.models().load(request.model_name)
            return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        async with self._rpc("RepositoryModelUnload", context):
            await self.service.models().unload(request.model_name)
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
            if "Retry-After" in exc.headers:
                context.set_trailing_metadata((("retry-after", exc.headers["Retry-After"]),))
        except Exception:
            code, message = grpc.StatusCode.INTERNAL, "internal error; the server's log has the details"
            logger.exception("gRPC %s failed", method)
        finally:
            self.service.metrics.grpc_requests.labels(method, code.name).inc()
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message)


class Authentication(grpc.aio.ServerInterceptor):
    """With API_KEY set, checks the `authorization: Bearer <key>` metadata of the calls that need it before their
    message is deserialized: a wrong key costs no more than UNAUTHENTICATED."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
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
                verify_api_key(self.settings, str(metadata.get("authorization", "")))
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
    def __init__(self, service: Service) -> None:
        settings = service.settings
        assert settings.grpc_port is not None
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.address = f"{host}:{settings.grpc_port}"
        self._server = grpc.aio.server(
            interceptors=[Authentication(settings, service.metrics)],
            options=[
                ("grpc.max_receive_message_length", settings.max_upload_bytes),
                # worker processes share the port, each with its own socket (as on the HTTP port); alone, a second
                # server on the same port is refused rather than silently given half the calls
                ("grpc.so_reuseport", int(service.metrics.workers.shared)),
            ],
            maximum_concurrent_rpcs=settings.max_concurrency,
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), self._server)

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
