"""ASGI middleware: request context and accounting, a request whose client has gone cancelled, the refusals a
request's headers decide (a bound on the requests in flight, the API key, early refusal under overload), limits on
request bodies (size, time, and their memory), a quiet start-up failure. Each layer costs every request a call, and
often a wrapped receive or send: the refusals share one.

Each receives the server's Service at construction. The refusals that concern some routes only (the API key,
early refusal), and answer in a route's error shape, look the request up in a table of the app's routes made from
the routes as FastAPI resolves them: the routes say what they need (their marker dependencies, app.http.deps) and
the shape of their errors (their route class), not a list of paths here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.auth import Access
from app.core.cost import BODY_COPIES
from app.core.memory import Lease
from app.core.service import Service
from app.errors import BodyTimeout, Overloaded, PayloadTooLarge, ServiceError, StartupError, Unauthorized
from app.http.deps import admits_inference, requires_api_key, requires_model_control_key
from app.http.errors import ProtocolRoute, Shape, error_response, internal_message

logger = logging.getLogger("app")
REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# A request whose client went away before its answer counts under this status (nginx's "client closed request").
CLIENT_GONE = 499
# Methods counted by name in ensemble_http_requests_total; any other a client makes up counts as "other", so that
# clients cannot create series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


@dataclass(frozen=True)
class RouteEntry:
    path: re.Pattern[str]
    methods: frozenset[str]
    markers: frozenset[Callable[..., Any]]
    shape: Shape


@dataclass(frozen=True)
class RouteMatch:
    markers: frozenset[Callable[..., Any]]
    parameters: dict[str, str]
    shape: Shape


NO_ROUTE = RouteMatch(frozenset(), {}, "service")
ACCESS = {requires_api_key: Access.INFERENCE, requires_model_control_key: Access.MODEL_CONTROL}  # marker: the key


class RouteTable:
    """The app's routes with their marker dependencies (their routers' included) and their error shape, to find
    a request's before the app reads it."""

    def __init__(self, app: FastAPI, markers: Collection[Callable[..., Any]]) -> None:
        self.routes = [
            RouteEntry(
                route.path_regex,
                frozenset(route.methods or ()),
                frozenset(d.dependency for d in getattr(route, "dependencies", ()) if d.dependency in markers),
                "protocol" if isinstance(route.original_route, ProtocolRoute) else "service",
            )
            for route in iter_route_contexts(app.routes)
            if getattr(route, "path_regex", None) is not None
        ]

    def match(self, scope: Scope) -> RouteMatch:
        """The markers, path parameters and error shape of the route a request goes to."""
        for route in self.routes:
            found = route.path.match(scope["path"])
            if found and scope["method"] in route.methods:
                return RouteMatch(route.markers, found.groupdict(), route.shape)
        return NO_ROUTE


async def refuse(scope: Scope, receive: Receive, send: Send, error: ServiceError, shape: Shape) -> None:
    """Answers with the error now, without reading the body: uvicorn drops whatever the client still sends once
    the answer is complete (either parser), so the connection ends cleanly or stays usable."""
    request_id = scope.get("state", {}).get("request_id")
    response = error_response(shape, error.status, error.code, error.message, request_id, error.headers)
    await response(scope, receive, send)


def request_id_from(headers: Headers) -> str:
    """The caller's request id if it is short and plain (it goes into logs and headers), else a new one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContext:
    """Gives each request an id and an arrival time (request.state), echoes the id in X-Request-ID, counts
    requests by route template and status class, and turns any unexpected error into a JSON 500 that
    carries the request id and nothing of the internals (the traceback goes to the log)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.metrics = service.metrics
        self.served_here = service.metrics.worker_http_requests.labels(service.workers.label)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(Headers(scope=scope))
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, arrived=time.perf_counter())
        status, started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:  # the client went away before its answer: nobody to answer
            status = CLIENT_GONE
            logger.info("request %s: the client disconnected before its answer", request_id)
        except Exception:
            logger.exception("request %s failed", request_id)
            if not started:
                response = error_response("service", 500, "internal_error", internal_message(request_id), request_id)
                await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.http_requests.labels(route, method, f"{status // 100}xx").inc()
            self.served_here.inc()


class DisconnectWatch:
    """A request's receive() and send(), which once its body is complete watch the connection for the client
    leaving before its answer is sent, and then cancel the task handling the request.

    Only one caller may wait on uvicorn's receive() at a time: from the end of the body on, the watcher is that
    caller, and the app's own calls get the message the watcher receives. Uvicorn's receive() then returns
    `http.disconnect` when the client closes its connection, or once the answer is sent (which is not a leaving).
    """

    def __init__(self, receive: Receive, send: Send, task: asyncio.Task[Any]) -> None:
        self._receive, self._send, self._task = receive, send, task
        self._watcher: asyncio.Task[Message] | None = None
        self.answered = False
        self.cancelled = False  # whether it cancelled the task

    async def receive(self) -> Message:
        if self._watcher is not None:
            return await asyncio.shield(self._watcher)
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self._watcher = asyncio.create_task(self._watch(), name="disconnect-watch")
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.answered = True
        await self._send(message)

    async def _watch(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.answered:
            self.cancelled = True
            self._task.cancel()
        return message

    def stop(self) -> None:
        """Stops watching: the request's handling has ended, there is nothing left to cancel."""
        if self._watcher is not None:
            self._watcher.cancel()


class CancelOnDisconnect:
    """Stops handling a request whose client has gone, so that it costs nothing more: once the body is complete,
    the client leaving before its answer cancels the request's task (DisconnectWatch), wherever it waits (for an
    inference slot, for its batch, for its inference to finish). Unwinding, the scheduler drops its place in the
    queue, BodyLimits gives back its memory, and RequestContext counts it as gone (ClientDisconnect).

    A client that leaves while still sending its body is noticed by the app as it reads (Starlette's
    ClientDisconnect); one that leaves after its answer costs nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        if scope["type"] != "http" or task is None:
            await self.app(scope, receive, send)
            return
        watch = DisconnectWatch(receive, send, task)
        try:
            await self.app(scope, watch.receive, watch.send)
        except asyncio.CancelledError:
            # Cancelled by the watch alone (not also by the server stopping): the client is gone, say so upwards.
            if watch.cancelled and task.uncancel() == 0:
                raise ClientDisconnect() from None
            raise
        else:
            if watch.cancelled:  # the app swallowed the cancellation and finished: the request is over anyway
                task.uncancel()
        finally:
            watch.stop()


class Gate:
    """Refuses a request from its headers, before anything reads its body, in its route's error shape (one layer
    that finds the route once, each check its own method, in this order):

    - beyond MAX_CONCURRENCY requests in flight in this process, from their headers to their answer: 503
      `overloaded` with Retry-After;
    - a route marked `requires_api_key` or `requires_model_control_key` without a bearer token that opens it, when
      keys are set (app.core.auth): 401, so that a wrong key costs no more than that;
    - an inference request (a route marked `admits_inference`) that admission control would refuse anyway (queue
      full, or its expected wait over MAX_QUEUE_WAIT_MS): 503 and Retry-After (early refusal), so that refusing
      costs no decoding or parsing and under overload the cores stay with the inferences. A request for another
      model than the one served goes on, to its 404.

    A refusal goes out before the body is read and keeps the connection alive: uvicorn reads whatever the client
    still uploads and drops it, so an uploading client gets its answer and its connection ends cleanly (closing it
    instead would reset the connection under its feet). The probes (`probes`: their paths) are never refused nor
    counted, so that an orchestrator does not take a busy instance for a dead one. Idle connections hold none of
    the places in flight: app.http.connections bounds them apart (MAX_CONNECTIONS, with HEADER_TIMEOUT_S), so that
    connections sending nothing cannot keep requests out.
    """

    def __init__(self, app: ASGIApp, service: Service, routes: RouteTable, probes: Collection[str]) -> None:
        self.app = app
        self.service = service
        self.routes = routes
        self.probes = frozenset(probes)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.probes:
            await self.app(scope, receive, send)
            return
        route = self.routes.match(scope)
        refused = self._overloaded() or self._unauthorized(scope, route) or self._refused_early(route)
        if refused is not None:
            await refuse(scope, receive, send, refused, route.shape)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _overloaded(self) -> ServiceError | None:
        if self.in_flight < self.service.settings.max_concurrency:
            return None
        return Overloaded(
            f"{self.in_flight} requests are in flight, the most this server takes at once (MAX_CONCURRENCY); "
            "retry later"
        )

    def _unauthorized(self, scope: Scope, route: RouteMatch) -> ServiceError | None:
        access = next((ACCESS[marker] for marker in route.markers if marker in ACCESS), None)
        if access is None:
            return None
        try:
            self.service.keys.verify(access, Headers(scope=scope).get("authorization"))
        except Unauthorized as refused:
            return refused
        return None

    def _refused_early(self, route: RouteMatch) -> ServiceError | None:
        dataplane = self.service.dataplane
        if admits_inference not in route.markers or dataplane is None or dataplane.model is None:
            return None
        if route.parameters.get("model_name") not in (None, dataplane.model.manifest.name):
            return None
        refused = dataplane.admission.refusal()
        if refused is not None:
            self.service.metrics.early_refusals.inc()
        return refused


class BodyLimits:
    """Bounds every request body: at most MAX_UPLOAD_BYTES (declared in Content-Length or streamed), else 413; all
    of it within BODY_TIMEOUT_S of the request's arrival, else 408; and its memory, which it reserves on the
    request's lease of the memory budget as it arrives (app.core.memory: 413 past MAX_REQUEST_BYTES, 503 past the
    budget). The lease, request.state.lease, is given back when the request ends. The 413 keeps the connection
    alive: uvicorn drops the rest of the upload (for its keep-alive timeout at most), so the client reads its
    answer instead of a reset; the 408 closes it, the client having stopped sending.

    Uvicorn has no timeout for a body that stops arriving; without this one a stalled upload would hold its
    connection and its task forever. Nothing is admitted (no queue place, no inference slot) before the body
    is read, so a slow upload holds only its connection and the bytes it sent.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        dataplane = self.service.dataplane if scope["type"] == "http" else None
        if dataplane is None:  # not an HTTP request, or the model is still loading: the routes answer 503
            await self.app(scope, receive, send)
            return
        lease = dataplane.memory.lease()
        scope["state"]["lease"] = lease
        try:
            await self.app(scope, self._limited(lease, scope, receive), send)
        finally:
            lease.release()

    def _limited(self, lease: Lease, scope: Scope, receive: Receive) -> Receive:
        settings = self.service.settings
        limit, timeout_s = settings.max_upload_bytes, settings.body_timeout_s
        declared = Headers(scope=scope).get("content-length", "")
        deadline = asyncio.get_running_loop().time() + timeout_s
        received, complete = 0, False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline on that
                return await receive()
            if declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(f"the body has {declared} bytes, more than the limit of {limit}")
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {timeout_s:g} s ({received} bytes received)"
                ) from None
            chunk = len(message.get("body", b""))
            received += chunk
            if received > limit:
                raise PayloadTooLarge(f"the body has more than the limit of {limit} bytes")
            if chunk:  # a request without a body reserves nothing (app.core.memory.REQUEST_BASE_BYTES)
                lease.reserve(chunk * BODY_COPIES, "the request body")
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return limited_receive


class QuietStartupFailure:
    """Reports a StartupError as its one-line message instead of a traceback.

    Starlette sends any lifespan failure to the server with the traceback as the message, and uvicorn
    logs it; for a known cause (missing model, bad setting) the cause alone is the useful line.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_startup_failure)
        except StartupError as exc:
            await send({"type": "lifespan.startup.failed", "message": f"cannot start: {exc}"})
        except BaseException:
            for message in held:
                await send(message)
            raise
