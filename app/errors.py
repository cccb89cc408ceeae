"""One error hierarchy for every front: each error a client sees carries its status (HTTP's; the gRPC front maps
it to a status code), a stable machine-readable code, a message for people, and the headers it needs
(Retry-After, WWW-Authenticate). app.http.errors renders them as JSON, app.grpc as gRPC statuses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

RETRY_AFTER_S = 1
CLOSE = {"Connection": "close"}  # for a stalled body: the client stopped sending, the connection ends


class StartupError(Exception):
    """The service cannot start: configuration or model directory unusable. Its message is the one log line."""


class ServiceError(Exception):
    """An error a client sees; subclasses fix the status and a stable machine-readable code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})


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
