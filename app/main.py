"""The application factory: `create_app(settings)`, or `uvicorn --factory app.main:create_app` to read the
settings from the environment. The settings are resolved once, here, into the Service every front receives."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.formparsers import MultiPartParser
from starlette.middleware.cors import CORSMiddleware

from app.core.auth import Keys
from app.core.dataplane import DataPlane
from app.core.model import load_model, log_model
from app.core.repository import ModelRepository
from app.core.service import Service
from app.engine.resources import usable_memory
from app.grpc import GrpcServer
from app.http.deps import admits_inference, requires_api_key, requires_model_control_key
from app.http.errors import install_error_handlers
from app.http.middleware import BodyLimits, CancelOnDisconnect, Gate, QuietStartupFailure, RequestContext, RouteTable
from app.http.ops import OpsServer
from app.http.routes import health, monitoring, predict, ui, v2, v2_repository
from app.observability.metrics import ServiceMetrics
from app.settings import Settings
from app.v2.codec import SERVER_VERSION
from app.workers import WorkerGroup
from ensemble_contract.modes import describe_modes

logger = logging.getLogger("app")

DESCRIPTION = f"""
Serves an ensemble of ONNX models (ours, or any a user fused with `python -m model_build fuse`) in several ways
and lets you compare them live. Modes: {describe_modes()}. Choose per request with `?mode=` (`/predict`) or the
`mode` parameter (`/v2`). Latencies per mode: `/metrics` (Prometheus) and `/stats`.
"""


def create_app(
    settings: Settings | None = None, *, registry: CollectorRegistry | None = None, workers: WorkerGroup | None = None
) -> FastAPI:
    """The app, with `settings` (by default read from the environment now: StartupError naming what is wrong),
    its metrics on `registry` (by default a new one with the process's collectors), as one of `workers` (by
    default as its environment says: a worker its supervisor started, or a process serving alone)."""
    settings = settings or Settings.from_env()
    workers = workers or WorkerGroup.from_env()
    metrics = ServiceMetrics(registry, workers) if registry is not None else ServiceMetrics.for_process(workers)
    service = Service(settings, metrics, workers, Keys(settings))
    # An upload stays in memory, where the memory budget counts it, rather than spooled to /tmp past 1 MB
    # (Starlette's default): /tmp is a small tmpfs in the container, and in memory all the same.
    MultiPartParser.spool_max_size = settings.max_upload_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = await anyio.to_thread.run_sync(load_model, settings, workers)
        dataplane = DataPlane(settings, model, metrics, workers)
        repository = ModelRepository(settings, dataplane, metrics, workers)
        service.dataplane, service.repository = dataplane, repository
        if dataplane.model is not None:  # a replacement worker follows the others' unload (app.core.repository)
            log_model(model, settings, workers.cores)
        logger.info(
            "memory: requests in flight may hold %.0f MiB together (MEMORY_BUDGET_BYTES; the process may use %s), "
            "one request %.0f MiB and %d rows; ONNX Runtime needs %.0f bytes per input element",
            dataplane.memory.total_bytes / 2**20,
            usable_memory().describe(),
            dataplane.memory.per_request_bytes / 2**20,
            model.cost.max_rows,
            model.cost.working_bytes_per_element,
        )
        ops = OpsServer(app, settings, shared=workers.shared) if settings.metrics_port is not None else None
        grpc = GrpcServer(service) if settings.grpc_port is not None else None
        try:
            if ops is not None:
                await ops.start()
                logger.info("serving /metrics and the probes on port %d too", settings.metrics_port)
            if grpc is not None:
                await grpc.start()
                logger.info("serving the Open Inference Protocol over gRPC on port %d", settings.grpc_port)
            with repository.reloading_on_sighup():
                yield
        finally:
            if grpc is not None:
                await grpc.stop(settings.shutdown_grace_s)
            if ops is not None:
                await ops.stop()
            dataplane.close()

    app = FastAPI(title="ONNX ensemble serving", version=SERVER_VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    for router in (predict.router, v2.router, v2_repository.router, health.router, monitoring.router, ui.router):
        app.include_router(router)
    # The last one added is the outermost: a request passes the gate (a place among those in flight, its key,
    # early refusal) before anything reads it; the watch for its client leaving surrounds all that may wait.
    routes = RouteTable(app, (requires_api_key, requires_model_control_key, admits_inference))
    probes = [app.url_path_for(name) for name in ("healthz", "readyz", "live", "ready")]
    app.add_middleware(BodyLimits, service=service)
    app.add_middleware(Gate, service=service, routes=routes, probes=probes)
    app.add_middleware(CancelOnDisconnect)
    if settings.cors_origins:  # otherwise no CORS header: browsers allow same-origin only
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Server-Timing", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestContext, service=service)
    app.add_middleware(QuietStartupFailure)
    return app
