"""Dependencies of the routers, as Annotated aliases."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.dataplane import DataPlane
from app.errors import NotReady, Unauthorized
from app.model import LoadedModel
from app.repository import ModelRepository
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


def check_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """401 unless API_KEY is unset or the request carries it as a bearer token (compared in constant time)."""
    verify_api_key(getattr(request.app.state, "settings", None), credentials.credentials if credentials else None)


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
ModelDep = Annotated[LoadedModel, Depends(using_model)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
ArrivalDep = Annotated[float, Depends(get_arrival)]
Authorized = Depends(check_api_key)
