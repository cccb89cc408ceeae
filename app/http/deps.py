"""Dependencies of the routers, as Annotated aliases, and the marker dependencies that say what a route needs
before its body is read (app.http.middleware finds routes by them).

Every one is `async def`, though none awaits: FastAPI runs a plain `def` dependency in its thread pool, a
thread hand-off per dependency per request, which cost the inference routes a fifth of the event loop's time."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.dataplane import DataPlane
from app.core.memory import Lease
from app.core.repository import ModelRepository
from app.core.service import Service
from app.errors import NotReady

bearer = HTTPBearer(
    auto_error=False, description="The API key, when API_KEY is set: `Authorization: Bearer <API_KEY>`."
)
# In OpenAPI: the bearer key, or nothing (when API_KEY is unset); FastAPI appends this to its own requirement.
OPTIONAL_BEARER: dict[str, Any] = {"security": [{}]}


async def get_service(request: Request) -> Service:
    """The server's shared state, which the app factory made."""
    service: Service = request.app.state.service
    return service


async def get_dataplane(service: Annotated[Service, Depends(get_service)]) -> DataPlane:
    """The data plane; 503 while the model is loading."""
    return service.serving()


async def get_repository(service: Annotated[Service, Depends(get_service)]) -> ModelRepository:
    return service.models()


async def get_arrival(request: Request) -> float:
    """time.perf_counter() when the request arrived (set by the RequestContext middleware; the operations port has
    none: its requests count as arriving now)."""
    return float(getattr(request.state, "arrived", None) or time.perf_counter())


async def get_lease(request: Request) -> Lease:
    """The request's share of the memory budget (app.http.middleware.BodyLimits takes it as the request arrives,
    once the model is loaded; 503 before)."""
    lease: Lease | None = getattr(request.state, "lease", None)
    if lease is None:
        raise NotReady()
    return lease


async def requires_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Marks a route as needing an inference key (API_KEY, API_KEYS_FILE), and declares the bearer key in OpenAPI.
    The key itself is checked from the headers before the body is read, by app.http.middleware.Gate, which finds
    routes by this marker (app.core.auth)."""
    del credentials


async def requires_model_control_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Marks a model repository route as needing MODEL_CONTROL_KEY, checked as requires_api_key's key is."""
    del credentials


async def admits_inference() -> None:
    """Marks a route as an inference request, which app.http.middleware.Gate refuses as its headers arrive
    when admission control would refuse it anyway."""


ServiceDep = Annotated[Service, Depends(get_service)]
DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
RepositoryDep = Annotated[ModelRepository, Depends(get_repository)]
LeaseDep = Annotated[Lease, Depends(get_lease)]
ArrivalDep = Annotated[float, Depends(get_arrival)]
Authorized = Depends(requires_api_key)
ControlAuthorized = Depends(requires_model_control_key)
AdmitsInference = Depends(admits_inference)
