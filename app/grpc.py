"""The Open Inference Protocol over gRPC (GRPC_PORT): a translator between protobuf and the data plane, with the
protocol's encodings from app.v2.codec (which the REST front shares); it imports nothing of the HTTP front.

The service and its messages are the protocol's `inference.GRPCInferenceService`, with the generated code that
tritonclient ships (Triton's superset of the KServe v2 .proto; the methods a v2 client calls are the same).
Errors carry the status code of their HTTP twin (400: INVALID_ARGUMENT, 503: UNAVAILABLE, ...), so both fronts
answer the same questions the same way. A grpc.aio server on the main server's event loop, started and stopped
by the app's lifespan.

Every method is served as a client-streaming one (`Calls`): grpc's unary handlers receive the whole request
message, up to MAX_UPLOAD_BYTES and however slowly it comes, before the application sees the call. A unary call
is a stream of one message on the wire, so clients call them as the .proto says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as pb

from app.core.auth import Access, Keys
from app.core.cost import message_bytes
from app.core.repository import ModelState
from app.core.service import Service
from app.core.tensors import TensorInference
from app.errors import RETRY_AFTER_S, BadRequest, BodyTimeout, NotReady, ServiceError, StartupError
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
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
ACCESS = {  # the calls that need a key, and which
    "ModelInfer": Access.INFERENCE,
    **dict.fromkeys(("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"), Access.MODEL_CONTROL),
}
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _tensor_metadata(tensor: TensorDescription) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)


class InferenceServicer:
    """Every RPC a v2 client needs, and the model repository's; grpc answers UNIMPLEMENTED to the others. Method
    names are the protocol's; each takes the request message and when its call arrived (time.perf_counter())."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def ServerLive(self, request: pb.ServerLiveRequest, arrived: float) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, arrived: float) -> pb.ServerReadyResponse:
        try:
            ready = self.service.serving().server_ready(arrived)
        except NotReady:  # loading, or draining: the protocol's answer is the flag
            ready = False
        return pb.ServerReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, arrived: float) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, arrived: float) -> pb.ModelReadyResponse:
        dataplane = self.service.dataplane
        return pb.ModelReadyResponse(ready=dataplane is not None and dataplane.model_ready(request.name, arrived))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, arrived: float) -> pb.ModelMetadataResponse:
        manifest = self.service.serving().manifest(request.name, arrived)
        inputs, outputs = tensor_descriptions(manifest)
        return pb.ModelMetadataResponse(
            name=manifest.name,
            platform=PLATFORM,
            inputs=[_tensor_metadata(tensor) for tensor in inputs],
            outputs=[_tensor_metadata(tensor) for tensor in outputs],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, arrived: float) -> pb.ModelInferResponse:
        dataplane = self.service.serving()
        lease = dataplane.memory.lease()
        try:  # a call cancelled by its client or its deadline gives its reservation back here, on its way out
            tensors_named = len(request.inputs) + len(request.outputs)
            lease.reserve(message_bytes(request.ByteSize(), tensors_named), "the request message")
            tensors = grpc_request(request)
            result = await dataplane.infer(TensorInference(tensors), arrived=arrived, front="grpc", lease=lease)
        finally:
            lease.release()
        return grpc_response(result, request.id)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, arrived: float) -> pb.RepositoryIndexResponse:
        listed = await self.service.models().index()
        entries = [e for e in listed if e.state is ModelState.READY or not request.ready]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=e.name, state=e.state, reason=e.reason) for e in entries]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, arrived: float
    ) -> pb.RepositoryModelLoadResponse:
        await self.service.models().load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, arrived: float
    ) -> pb.RepositoryModelUnloadResponse:
        await self.service.models().unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class CallEnded(Exception):
    """The call ended before its message came: cancelled by its client, past its deadline, or failed by grpc itself
    (a message over MAX_UPLOAD_BYTES, which grpc answers RESOURCE_EXHAUSTED); CANCELLED, as grpc's own unary
    handlers take it (were the client still there, it sent no message)."""


class TooManyCalls(Exception):
    """MAX_CONCURRENCY calls are in flight: RESOURCE_EXHAUSTED at once, with Retry-After (HTTP answers 503)."""


@dataclass(frozen=True)
class Rpc:
    name: str
    request_type: type[Message]
    serve: Callable[[Any, float], Awaitable[Message]]


class Calls:
    """What happens to a call before its servicer method sees it, in this order: past MAX_CONCURRENCY calls in
    flight it is refused at once; its API key is checked from its metadata (when its method needs one) before any
    byte of its message is read; its message must arrive within BODY_TIMEOUT_S. Then it is counted by method and
    status code, an error turned into its status code and message (Retry-After into trailing metadata).

    A call its client cancels, or whose deadline passes, is cancelled where it waits (grpc cancels its task: its
    queue place and memory are given back on the way out; a wait for its message ends), and counted as CANCELLED."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, keys: Keys, servicer: InferenceServicer) -> None:
        self.settings = settings
        self.metrics = metrics
        self.keys = keys
        self.in_flight = 0
        handlers = {}
        for method in SERVICE.methods:
            if method.name in vars(InferenceServicer):  # grpc answers UNIMPLEMENTED to the others
                rpc = Rpc(method.name, getattr(pb, method.input_type.name), getattr(servicer, method.name))
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    partial(self._call, rpc), response_serializer=getattr(pb, method.output_type.name).SerializeToString
                )
        self.handler = grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    async def _call(self, rpc: Rpc, requests: object, context: grpc.aio.ServicerContext) -> Message:
        """`requests` stays unread: `_read` reads the one message once the call has got that far. Each call is
        counted before its answer goes out, so a client that has its answer finds it counted."""
        arrived = time.perf_counter()
        try:
            response = await self._serve(rpc, arrived, context)
        except asyncio.CancelledError:  # grpc cancels the task of a call that is gone
            self._count(rpc, grpc.StatusCode.CANCELLED)
            raise
        except Exception as error:
            code, message, retry_after = _grpc_status(rpc.name, error)
            self._count(rpc, code)
            if retry_after is not None:
                context.set_trailing_metadata((("retry-after", retry_after),))
            await context.abort(code, message)
        self._count(rpc, grpc.StatusCode.OK)
        return response

    def _count(self, rpc: Rpc, code: grpc.StatusCode) -> None:
        self.metrics.grpc_requests.labels(rpc.name, code.name).inc()

    async def _serve(self, rpc: Rpc, arrived: float, context: grpc.aio.ServicerContext) -> Message:
        settings = self.settings
        if self.in_flight >= settings.max_concurrency:
            raise TooManyCalls(
                f"{self.in_flight} calls are in flight, MAX_CONCURRENCY ({settings.max_concurrency}); retry later"
            )
        self.in_flight += 1
        try:
            if (access := ACCESS.get(rpc.name)) is not None:
                self.keys.verify(access, dict(context.invocation_metadata() or ()).get("authorization"))
            request = await self._read(rpc, context)
            return await rpc.serve(request, arrived)
        finally:
            self.in_flight -= 1

    async def _read(self, rpc: Rpc, context: grpc.aio.ServicerContext) -> Message:
        """The call's one message, which must arrive within BODY_TIMEOUT_S (from now: the call has just arrived)."""
        timeout_s = self.settings.body_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                data = await context.read()
        except TimeoutError:
            raise BodyTimeout(f"the request message did not arrive within {timeout_s:g} s (BODY_TIMEOUT_S)") from None
        if data is grpc.aio.EOF:
            raise CallEnded(f"the call ended before its {rpc.request_type.__name__} message")
        try:
            return rpc.request_type.FromString(data)
        except DecodeError:
            raise BadRequest(f"the request message is not a valid {rpc.request_type.__name__}") from None


def _grpc_status(method: str, error: Exception) -> tuple[grpc.StatusCode, str, str | None]:
    """The status code, message and Retry-After (if any) that answer `error`."""
    if isinstance(error, CallEnded):
        return grpc.StatusCode.CANCELLED, str(error), None
    if isinstance(error, TooManyCalls):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), str(RETRY_AFTER_S)
    if isinstance(error, ServiceError):
        code = STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("gRPC %s failed: %s", method, error.message, exc_info=error.__cause__ or error)
        return code, error.message, error.headers.get("Retry-After")
    logger.error("gRPC %s failed", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error; the server's log has the details", None


class GrpcServer:
    def __init__(self, service: Service) -> None:
        settings = service.settings
        assert settings.grpc_port is not None
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.address = f"{host}:{settings.grpc_port}"
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_upload_bytes),
                # One connection may open as many calls as are served in all, and one more, which Calls refuses at
                # once with RESOURCE_EXHAUSTED: a call past HTTP/2's limit would wait in its client instead.
                ("grpc.max_concurrent_streams", settings.max_concurrency + 1),
                # worker processes share the port, each with its own socket (as on the HTTP port); alone, a second
                # server on the same port is refused rather than silently given half the calls
                ("grpc.so_reuseport", int(service.workers.shared)),
            ],
        )
        calls = Calls(settings, service.metrics, service.keys, InferenceServicer(service))
        self._server.add_generic_rpc_handlers((calls.handler,))

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
