"""The application factory; `uvicorn app.main:app` serves `app`, configured from the environment at start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.formparsers import MultiPartParser

from app.core.dataplane import DataPlane
from app.core.repository import ModelRepository
from app.engine.model import load_model, log_model
from app.engine.resources import usable_memory
from app.errors import install_error_handlers
from app.grpc import GrpcServer
from app.http.deps import admits_inference, requires_api_key
from app.http.middleware import (
    Authentication,
    BodyLimits,
    CORSFromSettings,
    EarlyRefusal,
    QuietStartupFailure,
    RequestContext,
    RouteMarkers,
)
from app.http.ops import OpsServer
from app.http.routes import health, monitoring, predict, repository, ui, v2
from app.observability.metrics import Metrics
from app.settings import Settings
from ensemble_contract.modes import describe_modes

logger = logging.getLogger("app")

DESCRIPTION = f"""
Serves an ensemble of ONNX models (ours, or any a user fused with `python -m model_build fuse`) in several ways
and lets you compare them live. Modes: {describe_modes()}. Choose per request with `?mode=` (`/predict`) or the
`mode` parameter (`/v2`). Latencies per mode: `/metrics` (Prometheus) and `/stats`.
"""


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The app; without settings they are read from the environment when it starts (in the lifespan)."""
    metrics = Metrics(registry) if registry is not None else Metrics.with_process_collectors()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or Settings.from_env()
        # An upload stays in memory, where the memory budget counts it, rather than spooled to /tmp past 1 MB
        # (Starlette's default): /tmp is a small tmpfs in the container, and in memory all the same.
        MultiPartParser.spool_max_size = resolved.max_upload_bytes
        model = await anyio.to_thread.run_sync(load_model, resolved)
        dataplane = DataPlane(resolved, model, metrics)
        repository = ModelRepository(resolved, dataplane, metrics)
        app.state.settings, app.state.dataplane, app.state.repository = resolved, dataplane, repository
        log_model(model, resolved)
        logger.info(
            "memory: requests in flight may hold %.0f MiB together (MEMORY_BUDGET_BYTES; the process may use %s), "
            "one request %.0f MiB and %d rows; ONNX Runtime needs %.0f bytes per input element",
            dataplane.memory.total_bytes / 2**20,
            usable_memory().describe(),
            dataplane.memory.per_request_bytes / 2**20,
            model.cost.max_rows,
            model.cost.working_bytes_per_element,
        )
        ops = OpsServer(app, resolved) if resolved.metrics_port is not None else None
        grpc = GrpcServer(resolved, dataplane, repository) if resolved.grpc_port is not None else None
        try:
            if ops is not None:
                await ops.start()
                logger.info("serving /metrics and the probes on port %d too", resolved.metrics_port)
            if grpc is not None:
                await grpc.start()
                logger.info("serving the Open Inference Protocol over gRPC on port %d", resolved.grpc_port)
            with repository.reloading_on_sighup():
                yield
        finally:
            if grpc is not None:
                await grpc.stop(resolved.shutdown_grace_s)
            if ops is not None:
                await ops.stop()
            dataplane.close()

    app = FastAPI(title="ONNX ensemble serving", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (predict.router, v2.router, repository.router, health.router, monitoring.router, ui.router):
        app.include_router(router)
    # The last one added is the outermost: a request meets the API key before anything else reads it.
    marked = RouteMarkers(app, (requires_api_key, admits_inference))
    app.add_middleware(BodyLimits)
    app.add_middleware(EarlyRefusal, routes=marked, metrics=metrics)
    app.add_middleware(Authentication, routes=marked)
    app.add_middleware(CORSFromSettings)
    app.add_middleware(RequestContext, metrics=metrics)
    app.add_middleware(QuietStartupFailure)
    return app


app = create_app()
