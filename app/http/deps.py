"""Dependencies of the routers, as Annotated aliases."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.dataplane import DataPlane
from app.core.memory import Lease
from app.core.repository import ModelRepository
from app.engine.model import LoadedModel
from app.errors import NotReady, Unauthorized
from app.settings import Settings

bearer = HTTPBearer(
    auto_error=False, description="The API key, when API_KEY is set: `Authorization: Bearer <API_KEY>`."
)
# In OpenAPI: the bearer key, or nothing (when API_KEY is unset); FastAPI appends this to its own requirement.
OPTIONAL_BEARER: dict[str, Any] = {"security": [{}]}


def get_dataplane(request: Request) -> DataPlane:
    """The loaded data plane; 503 while the models are loading, and for requests that arrive once the
    server is shutting down."""
    dataplane: DataPlane | None = getattr(request.app.state, "dataplane", None)
    if dataplane is None:
        raise NotReady()
    # The operations port has no RequestContext: its requests count as arriving now.
    if not dataplane.serves(getattr(request.state, "arrived", time.perf_counter())):
        raise NotReady("the server is shutting down")
    return dataplane


async def using_model(dataplane: Annotated[DataPlane, Depends(get_dataplane)]) -> AsyncIterator[LoadedModel]:
    """The model served when the request arrived, kept to its end even if a reload switches models meanwhile
    (an async dependency: the count of its requests is kept on the event loop)."""
    with dataplane.using() as model:
        yield model


def get_repository(request: Request, dataplane: Annotated[DataPlane, Depends(get_dataplane)]) -> ModelRepository:
    return request.app.state.repository


def get_arrival(request: Request) -> float:
    """time.perf_counter() when the request arrived (set by the RequestContext middleware)."""
    return float(request.state.arrived)


def requires_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Marks a route as needing API_KEY, and declares the bearer key in OpenAPI. The key itself is checked from
    the headers before the body is read, by app.http.middleware.Authentication, which finds routes by this marker."""
    del credentials


def admits_inference() -> None:
    """Marks a route as an inference request, which app.http.middleware.EarlyRefusal refuses as its headers arrive
    when admission control would refuse it anyway."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case); None otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def get_lease(request: Request) -> Lease:
    """The request's share of the memory budget (app.http.middleware.BodyLimits takes it as the request arrives, once
    the models are loaded; 503 before)."""
    lease: Lease | None = getattr(request.state, "lease", None)
    if lease is None:
        raise NotReady()
    return lease


def verify_api_key(settings: Settings | None, token: str | None) -> None:
    """Unauthorized unless API_KEY is unset or `token` is it (compared in constant time); every protocol's check."""
    key = settings.api_key if settings is not None else None
    if key is None:
        return
    if token is None:
        raise Unauthorized("this endpoint needs the API key: send `Authorization: Bearer <key>`", token_given=False)
    if not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
        raise Unauthorized("the API key is not valid", token_given=True)


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
LeaseDep = Annotated[Lease, Depends(get_lease)]
ModelDep = Annotated[LoadedModel, Depends(using_model)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
ArrivalDep = Annotated[float, Depends(get_arrival)]
Authorized = Depends(requires_api_key)
Inference = Depends(admits_inference)
