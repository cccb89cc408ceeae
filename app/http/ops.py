"""The operations port (METRICS_PORT): /metrics and the probes, served apart from the API.

A second uvicorn server on the main server's event loop, started and stopped by the app's lifespan, so it
exists exactly while the models are loaded, whichever way the app is served. Its app shares the main app's
state (the data plane, the metrics), so the probes there say what they say on the main port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Response

from app.errors import StartupError
from app.http.connections import ConnectionLimits
from app.http.deps import ServiceDep
from app.http.errors import install_error_handlers
from app.http.listen import listening_socket
from app.http.routes import health
from app.http.routes.monitoring import METRICS_RESPONSE, prometheus_text
from app.settings import Settings

START_TIMEOUT_S = 10


def create_ops_app(main: FastAPI) -> FastAPI:
    ops = FastAPI(title="operations", openapi_url=None, docs_url=None, redoc_url=None)
    ops.state = main.state
    install_error_handlers(ops)
    ops.include_router(health.router)

    @ops.get("/metrics", response_class=Response, responses=METRICS_RESPONSE)
    async def metrics(service: ServiceDep) -> Response:
        return prometheus_text(service)

    return ops


class _Embedded(uvicorn.Server):
    """A uvicorn server that leaves the signals to the main server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpsServer:
    def __init__(self, main: FastAPI, settings: Settings, *, shared: bool) -> None:
        assert settings.metrics_port is not None
        self.address, self.shared = (settings.host, settings.metrics_port), shared
        config = uvicorn.Config(
            create_ops_app(main),
            lifespan="off",
            log_config=None,  # the main server configured logging
            log_level=settings.log_level,
            access_log=False,
            server_header=False,
            http=ConnectionLimits.of(settings).protocol(settings.http_parser),  # the main port's limits
        )
        self._server = _Embedded(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listens on HOST:METRICS_PORT; StartupError if that address cannot be had."""
        try:
            sock = listening_socket(*self.address, shared=self.shared)
        except OSError as exc:
            raise StartupError(f"cannot listen on METRICS_PORT {self.address[1]}: {exc.strerror}") from None
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="ops-server")
        async with asyncio.timeout(START_TIMEOUT_S):
            while not self._server.started:
                if self._task.done():
                    self._task.result()
                    raise StartupError(f"the server on METRICS_PORT {self.address[1]} stopped at start-up")
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
