"""The application factory; `uvicorn app.main:app` serves `app`, configured from the environment at start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.dataplane import DataPlane
from app.errors import install_error_handlers
from app.grpc_server import GrpcServer
from app.metrics import Metrics
from app.middleware import BodyLimits, CORSFromSettings, EarlyRefusal, QuietStartupFailure, RequestContext
from app.model import load_model, log_model
from app.ops import OpsServer
from app.repository import ModelRepository
from app.routes import health, monitoring, predict, repository, ui, v2
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
        model = await anyio.to_thread.run_sync(load_model, resolved)
        dataplane = DataPlane(resolved, model, metrics)
        repository = ModelRepository(resolved, dataplane, metrics)
        app.state.settings, app.state.dataplane, app.state.repository = resolved, dataplane, repository
        log_model(model, resolved)
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
    # The last one added is the outermost.
    app.add_middleware(EarlyRefusal, metrics=metrics)
    app.add_middleware(BodyLimits)
    app.add_middleware(CORSFromSettings)
    app.add_middleware(RequestContext, metrics=metrics)
    app.add_middleware(QuietStartupFailure)
    return app


app = create_app()
