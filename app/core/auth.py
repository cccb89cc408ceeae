"""The API key, checked the same way for every front: from a request's `Authorization: Bearer <key>` (an HTTP
header, or gRPC's `authorization` metadata), compared in constant time."""

from __future__ import annotations

import hmac

from app.errors import Unauthorized
from app.settings import Settings


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (the scheme in any case); None otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def verify_api_key(settings: Settings, authorization: str | None) -> None:
    """Unauthorized unless API_KEY is unset or `authorization` carries it as a bearer token."""
    key = settings.api_key
    if key is None:
        return
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("this endpoint needs the API key: send `Authorization: Bearer <key>`", token_given=False)
    if not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise Unauthorized("the API key is not valid", token_given=True)
