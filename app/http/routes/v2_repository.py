"""The Open Inference Protocol's model repository extension: list, load (reload) and unload the model.

Errors come back as {"error": "message"}, as everywhere under /v2; the API key, when set, guards every call, and
every call answers 403 unless the server runs with MODEL_CONTROL=explicit.
A request body (the protocol's optional parameters) is accepted and not read.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.core.repository import ModelLoad, RepositoryEntry
from app.http.deps import OPTIONAL_BEARER, ControlAuthorized, RepositoryDep
from app.http.errors import ProtocolRoute, error_responses

router = APIRouter(
    prefix="/v2/repository",
    tags=["Model repository (v2)"],
    dependencies=[ControlAuthorized],
    responses=error_responses(401, 403, 500, 503, protocol=True),
    route_class=ProtocolRoute,
)


@router.post(
    "/index",
    summary="The model served, and the one MODEL_DIR holds if it is another build",
    openapi_extra=OPTIONAL_BEARER,
)
async def index(repository: RepositoryDep) -> list[RepositoryEntry]:
    return await repository.index()


@router.post(
    "/models/{model_name}/load",
    summary="Load MODEL_DIR again and switch to it without dropping a request",
    description="Reads MODEL_DIR again (a symlink is followed anew), verifies and warms the new sessions beside "
    "the old ones, then switches; requests already admitted finish on the old sessions. The model in MODEL_DIR "
    "must be named `model_name`. On failure (400) the old model keeps serving and the message says why.",
    openapi_extra=OPTIONAL_BEARER,
    responses=error_responses(400, protocol=True, s400="The load failed; the old model is still served."),
)
async def load(model_name: str, repository: RepositoryDep) -> ModelLoad:
    return await repository.load(model_name)


@router.post(
    "/models/{model_name}/unload",
    summary="Stop serving the model (readiness false, inference 503) until the next load",
    openapi_extra=OPTIONAL_BEARER,
    responses=error_responses(404, protocol=True, s404="That model is not loaded."),
)
async def unload(model_name: str, repository: RepositoryDep) -> dict[str, str]:
    await repository.unload(model_name)
    return {}
