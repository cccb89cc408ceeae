"""The application factory; `uvicorn app.main:app` serves `app`, configured from the environment at start-up."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.auto import AutoChoice, choose
from app.dataplane import DataPlane
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import BodyLimits, CORSFromSettings, EarlyRefusal, QuietStartupFailure, RequestContext
from app.ops import OpsServer
from app.priority import lower_thread_priority
from app.routes import health, monitoring, predict, ui, v2
from app.runtime import EnsembleRuntime
from app.settings import Settings
from ensemble_contract.modes import AUTO, describe_modes

logger = logging.getLogger("app")

DESCRIPTION = f"""
Serves an ensemble of ONNX models (ours, or any a user fused with `python -m model_build fuse`) in several ways
and lets you compare them live. Modes: {describe_modes()}. Choose per request with `?mode=` (`/predict`) or the
`mode` parameter (`/v2`). Latencies per mode: `/metrics` (Prometheus) and `/stats`.
"""


def _load_at_worker_priority(settings: Settings) -> tuple[EnsembleRuntime, AutoChoice | None]:
    """The runtime (with DEFAULT_MODE=auto: the layout measured fastest, and the measurement)."""
    lower_thread_priority()  # ONNX Runtime's pool threads, which the sessions start here, inherit it
    if settings.default_mode == AUTO:
        return choose(settings)
    return EnsembleRuntime.load(settings), None


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The app; without settings they are read from the environment when it starts (in the lifespan)."""
    metrics = Metrics(registry) if registry is not None else Metrics.with_process_collectors()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resolved = settings or Settings.from_env()
        runtime, auto = await anyio.to_thread.run_sync(_load_at_worker_priority, resolved)
        dataplane = DataPlane(resolved, runtime, metrics, auto)
        metrics.describe_model(runtime, runtime.slots, auto)
        if auto is not None:
            logger.info("auto: %s in layout %s (slots x threads): %s", auto.mode, auto.layout, auto.reason)
        app.state.settings, app.state.dataplane = resolved, dataplane
        manifest = runtime.manifest
        logger.info(
            "serving %s (ensemble sha256 %s, members %s), default mode %s, sessions: %s",
            manifest.name,
            manifest.ensemble.sha256[:12],
            ", ".join(member.name for member in manifest.members),
            resolved.default_mode,
            "; ".join(f"{mode} {plan.describe()}" for mode, plan in runtime.plans.items()),
        )
        ops = OpsServer(app, resolved) if resolved.metrics_port is not None else None
        try:
            if ops is not None:
                await ops.start()
                logger.info("serving /metrics and the probes on port %d too", resolved.metrics_port)
            yield
        finally:
            if ops is not None:
                await ops.stop()
            dataplane.close()

    app = FastAPI(title="ONNX ensemble serving", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (predict.router, v2.router, health.router, monitoring.router, ui.router):
        app.include_router(router)
    # The last one added is the outermost.
    app.add_middleware(EarlyRefusal, metrics=metrics)
    app.add_middleware(BodyLimits)
    app.add_middleware(CORSFromSettings)
    app.add_middleware(RequestContext, metrics=metrics)
    app.add_middleware(QuietStartupFailure)
    return app


app = create_app()
