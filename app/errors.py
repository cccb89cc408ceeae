"""One error hierarchy, each error carrying its HTTP status, and the handlers that turn errors into JSON.

Two shapes: `{"error": {"code", "message", "request_id"}}` everywhere, except under /v2 where the Open
Inference Protocol wants `{"error": "message"}`. A 500 names the request id in its message (in both shapes),
never the internals: the traceback goes to the log under that id.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

logger = logging.getLogger("app")

V2_PREFIX = "/v2"
RETRY_AFTER_S = 1
CLOSE = {"Connection": "close"}  # for a stalled body: the client stopped sending, the connection ends


class StartupError(Exception):
    """The service cannot start: configuration or model directory unusable. Its message is the one log line."""


class ServiceError(HTTPException):
    """An error a client sees; subclasses fix the status and a stable machine-readable code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(self.status, detail=message, headers=dict(headers or {}))
        self.message = message


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class BadImage(ServiceError):
    status, code = 400, "bad_image"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str, *, token_given: bool) -> None:
        challenge = 'Bearer error="invalid_token"' if token_given else "Bearer"
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class BodyTimeout(ServiceError):
    status, code = 408, "body_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers=CLOSE)


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class InvalidParameter(ServiceError):
    status, code = 422, "invalid_parameter"


class NotAnImageModel(ServiceError):
    """POST /predict on a model that takes no image: the answer points to /v2."""

    status, code = 404, "not_an_image_model"


class InferenceFailed(ServiceError):
    """ONNX Runtime failed during a request: the model's fault or ours, never the client's."""

    status, code = 500, "inference_failed"


class NotReady(ServiceError):
    status, code = 503, "not_ready"

    def __init__(self, message: str = "the models are not loaded yet") -> None:
        super().__init__(message, headers={"Retry-After": str(RETRY_AFTER_S)})


class Overloaded(ServiceError):
    """503 with Retry-After: when the queue should have room, in whole seconds, at least RETRY_AFTER_S."""

    status, code = 503, "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = RETRY_AFTER_S) -> None:
        super().__init__(message, headers={"Retry-After": str(max(RETRY_AFTER_S, math.ceil(retry_after_s)))})


class InferenceTimeout(ServiceError):
    status, code = 504, "timeout"


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The JSON error in the shape of the request's protocol."""
    request_id = getattr(request.state, "request_id", None)
    if request.url.path.startswith(V2_PREFIX):
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


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    message, status = exc.message, _protocol_status(request, exc.status)
    if status == 500:
        request_id = getattr(request.state, "request_id", None)
        logger.error("request %s failed: %s", request_id, message, exc_info=exc.__cause__ or exc)
        message = internal_message(request_id, message)
    return error_response(request, status, exc.code, message, exc.headers)


def _protocol_status(request: Request, status: int) -> int:
    """The protocol of /v2 answers every invalid request with 400; our own API invalid parameters with 422."""
    return 400 if status == 422 and request.url.path.startswith(V2_PREFIX) else status


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status = _protocol_status(request, InvalidParameter.status)
    return error_response(request, status, InvalidParameter.code, _describe_validation(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (404, 405, malformed multipart...) in our shape."""
    assert isinstance(exc, HTTPException)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    return error_response(request, exc.status_code, code, str(exc.detail), exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)


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
