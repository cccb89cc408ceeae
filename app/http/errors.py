"""HTTP errors as JSON, in the shape of the router that raised them: `{"error": {"code", "message", "request_id"}}`
for the service's own API, `{"error": "message"}` for the Open Inference Protocol's (whose routes are
ProtocolRoute's, and which answers every invalid request with 400). A 500 names the request id in its message,
never the internals: the traceback goes to the log under that id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping, Sequence
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from app.errors import InvalidParameter, ServiceError

logger = logging.getLogger("app")
Shape = Literal["service", "protocol"]


def error_response(
    shape: Shape, status: int, code: str, message: str, request_id: str | None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error in the given shape."""
    if shape == "protocol":
        content: dict[str, Any] = {"error": message}
    else:
        content = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(content, status_code=status, headers=dict(headers or {}))


def _describe_validation(errors: Sequence[Any]) -> str:
    """'query mode: Input should be ...; body inputs.0.shape: Field required' from pydantic's error list."""
    parts = []
    for error in errors:
        where, *path = (str(part) for part in error.get("loc", ()))
        location = f"{where} {'.'.join(path)}".strip()
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def internal_message(request_id: str | None, what: str = "internal error") -> str:
    return f"{what}; quote request id {request_id} when reporting it"


def response_to(exc: Exception, shape: Shape, request_id: str | None) -> JSONResponse:
    """The answer to an error a request met: ours, FastAPI's validation, Starlette's own (404, 405, malformed
    multipart...), or anything else (a 500 whose cause goes to the log)."""
    if isinstance(exc, ServiceError):
        message = exc.message
        if exc.status == 500:
            logger.error("request %s failed: %s", request_id, message, exc_info=exc.__cause__ or exc)
            message = internal_message(request_id, message)
        return error_response(shape, _http_status(shape, exc.status), exc.code, message, request_id, exc.headers)
    if isinstance(exc, RequestValidationError):
        status = _http_status(shape, InvalidParameter.status)
        return error_response(shape, status, InvalidParameter.code, _describe_validation(exc.errors()), request_id)
    if isinstance(exc, HTTPException):
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return error_response(shape, exc.status_code, code, str(exc.detail), request_id, exc.headers)
    logger.error("request %s failed", request_id, exc_info=exc)
    return error_response(shape, 500, "internal_error", internal_message(request_id), request_id)


def _http_status(shape: Shape, status: int) -> int:
    """The protocol answers every invalid request with 400; the service's own API an invalid parameter with 422."""
    return 400 if shape == "protocol" and status == InvalidParameter.status else status


def install_error_handlers(app: FastAPI) -> None:
    """The service's shape for errors raised outside protocol routes."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return response_to(exc, "service", getattr(request.state, "request_id", None))

    for kind in (ServiceError, RequestValidationError, HTTPException):
        app.add_exception_handler(kind, handle)


class ProtocolRoute(APIRoute):
    """A route of the Open Inference Protocol: whatever its handler, its dependencies, its body's validation or
    `prepare` raise is answered in the protocol's shape."""

    async def prepare(self, request: Request) -> Request:
        """The request the route's handler gets (a subclass may read its body first)."""
        return request

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def protocol_handler(request: Request) -> Response:
            try:
                return await handle(await self.prepare(request))
            except ClientDisconnect:
                raise
            except Exception as exc:
                return response_to(exc, "protocol", getattr(request.state, "request_id", None))

        return protocol_handler


# The error bodies as OpenAPI schemas, and the responses each operation declares with them.


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable: bad_image, unauthorized, overloaded, ...")
    message: str = Field(description="For people: what is wrong and how to fix it.")
    request_id: str | None = Field(description="Also in the X-Request-ID header; quote it when reporting a problem.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ProtocolError(BaseModel):
    """The Open Inference Protocol's error shape, under /v2."""

    error: str


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_CHALLENGE = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
ERROR_STATUSES: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Malformed request.", {}),
    401: ("API_KEY is set and the request has no valid `Authorization: Bearer <key>`.", _CHALLENGE),
    403: ("The model repository calls are off: the server runs with MODEL_CONTROL=none.", {}),
    404: ("Not found.", {}),
    408: ("The request body did not arrive within BODY_TIMEOUT_S.", {}),
    409: ("A model load is already running.", {}),
    413: (
        "More than MAX_UPLOAD_BYTES bytes, an image of more than MAX_IMAGE_PIXELS pixels, more rows than "
        "MAX_BATCH_ROWS, or more memory than MAX_REQUEST_BYTES; the message says which.",
        {},
    ),
    415: ("Unsupported media type.", {}),
    422: ("Invalid parameter.", {}),
    500: ("Internal error; the message names the request id.", {}),
    503: ("Not ready (loading or shutting down), or overloaded: retry after Retry-After seconds.", _RETRY_AFTER),
    504: ("No inference slot, or no result, within REQUEST_TIMEOUT_S.", {}),
}


def error_responses(*statuses: int, protocol: bool = False, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for `statuses` with the error body (the protocol's under /v2); descriptions by
    status as keyword `s404="..."` replace the standard ones."""
    model = ProtocolError if protocol else ErrorBody
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = ERROR_STATUSES[status]
        responses[status] = {"model": model, "description": descriptions.get(f"s{status}", description)}
        if headers:
            responses[status]["headers"] = headers
    if protocol:  # every client error has the protocol's shape (and FastAPI then adds no 422 of its own)
        responses["4XX"] = {"model": model, "description": "Any other client error."}
    return responses
