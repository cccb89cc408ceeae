"""ASGI middleware: request context and accounting, limits on request bodies (size and time), CORS when
configured, a quiet start-up failure."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTimeout, PayloadTooLarge, StartupError, error_response, internal_message
from app.metrics import Metrics
from app.settings import Settings

logger = logging.getLogger("app")
REQUEST_ID_HEADER = "X-Request-ID"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def request_id_from(headers: Headers) -> str:
    """The caller's request id if it is short and plain (it goes into logs and headers), else a new one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestContext:
    """Gives each request an id and an arrival time (request.state), echoes the id in X-Request-ID, counts
    requests by route template and status class, and turns any unexpected error into a JSON 500 that
    carries the request id and nothing of the internals (the traceback goes to the log)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
        except Exception:
            logger.exception("request %s failed", request_id)
            if not started:
                response = error_response(Request(scope), 500, "internal_error", internal_message(request_id))
                await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(route, scope["method"], f"{status // 100}xx").inc()


def settings_of(scope: Scope) -> Settings | None:
    """The settings the lifespan resolved (None before it ran, and for lifespan and websocket scopes)."""
    return getattr(scope["app"].state, "settings", None) if scope["type"] == "http" else None


class BodyLimits:
    """Bounds every request body: at most settings.max_upload_bytes (declared in Content-Length or streamed),
    else 413; all of it within settings.body_timeout_s of the request's arrival, else 408. The 413 keeps the
    connection alive: uvicorn drops the rest of the upload (for its keep-alive timeout at most), so the client
    reads its answer instead of a reset; the 408 closes it, the client having stopped sending.

    Uvicorn has no timeout for a body that stops arriving; without this one a stalled upload would hold its
    connection and its task forever. Nothing is admitted (no queue place, no inference slot) before the body
    is read, so a slow upload holds only its connection. The limits are read per request from
    app.state.settings, which the lifespan sets.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = settings_of(scope)
        if settings is None:
            await self.app(scope, receive, send)
            return
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
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLarge(f"the body has more than the limit of {limit} bytes")
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


INFERENCE_PATH = re.compile(r"/predict|/v2/models/(?P<model>[^/]+)/infer")


class EarlyRefusal:
    """Refuses an inference request with 503 and Retry-After as soon as its headers arrive, when admission
    control would refuse it anyway (queue full, or its expected wait over MAX_QUEUE_WAIT_MS), so that refusing
    costs no decoding or parsing: under overload the cores stay with the inferences.

    The answer goes out before the body is read, and keeps the connection alive: uvicorn then reads whatever
    the client still uploads and drops it (h11 ignores a request's data once its answer is complete), so the
    client gets its 503 while uploading and its connection ends cleanly; closing it instead would reset the
    connection under an uploading client's feet. A request for another model than the one served goes on,
    to its 404.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        dataplane = getattr(scope["app"].state, "dataplane", None) if scope["type"] == "http" else None
        refused = None
        inference = INFERENCE_PATH.fullmatch(scope["path"]) if dataplane is not None else None
        served = dataplane.model.manifest.name if dataplane is not None and dataplane.model is not None else None
        if inference and scope["method"] == "POST" and inference["model"] in (None, served):
            refused = dataplane.admission.refusal()
        if refused is None:
            await self.app(scope, receive, send)
            return
        self.metrics.early_refusals.inc()
        response = error_response(Request(scope), refused.status, refused.code, refused.message, refused.headers)
        await response(scope, receive, send)


class CORSFromSettings:
    """Starlette's CORS middleware with settings.cors_origins, built on the first request (the settings are
    resolved in the lifespan); with no origins configured, requests pass untouched and get no CORS header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = settings_of(scope)
        if settings is None or not settings.cors_origins:
            await self.app(scope, receive, send)
            return
        if self._cors is None:
            self._cors = CORSMiddleware(
                self.app,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Request-ID", "Server-Timing", "Retry-After"],
                max_age=600,
            )
        await self._cors(scope, receive, send)


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
