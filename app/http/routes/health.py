"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.core.auto import AutoChoice
from app.core.model import SessionsNow
from app.http.deps import ArrivalDep, DataPlaneDep, ServiceDep
from app.http.errors import error_responses
from ensemble_contract.modes import Mode

router = APIRouter(tags=["health"])


class Alive(BaseModel):
    status: str = "alive"


class WorkerServing(BaseModel):
    worker: int
    pid: int
    sha256: str | None = Field(description="The ensemble it serves; null while it loads or after an unload.")


class Readiness(BaseModel):
    status: str = "ready"
    model: str
    sha256: str
    modes: list[Mode]
    images: bool = Field(description="Whether POST /predict takes images for this model (otherwise: /v2 only).")
    auto: AutoChoice | None = Field(description="DEFAULT_MODE=auto: the choice, why, and every candidate's figures.")
    sessions: SessionsNow
    workers: list[WorkerServing] = Field(
        description="Every live worker process (one without WORKERS) and what it serves: after a load, each switches."
    )


@router.get("/healthz", summary="The process answers", responses=error_responses(500))
async def healthz() -> Alive:
    return Alive()


@router.get(
    "/readyz",
    summary="Sessions are loaded and warmed up",
    responses=error_responses(
        500, 503, s503="Not ready: the models are loading, the model was unloaded, or the server is stopping."
    ),
)
async def readyz(service: ServiceDep, dataplane: DataPlaneDep, arrived: ArrivalDep) -> Readiness:
    with dataplane.using(arrived) as model:
        return Readiness(
            model=model.manifest.name,
            sha256=model.sha256,
            modes=list(model.runtime.modes),
            images=model.manifest.image is not None,
            auto=model.auto,
            sessions=model.sessions_now(dataplane.settings, service.workers.cores),
            workers=[WorkerServing(worker=s.worker, pid=s.pid, sha256=s.sha256) for s in service.workers.statuses()],
        )
