"""`python -m app` (console script `ensemble-serve`): the app on HOST:PORT, served by one process, or with WORKERS
other than 1 by worker processes under a supervisor (app.supervisor), each of them this same command.

On SIGTERM (or Ctrl-C) readiness turns false at once, the listening socket closes, requests in flight get
SHUTDOWN_GRACE_S to finish, and the process exits 0. A second signal while draining (Ctrl-C twice) stops at
once. Start-up failures (bad setting: exit 2; unusable model directory: exit 3) print one line saying why.

SIGHUP (reload) is blocked first thing, before the imports (a second or more): its default action would kill the
process. One that arrives while the process starts stays pending until the handler that applies it is in place
(the supervisor's, or once the model is loaded the repository's, which logs and ignores it with
MODEL_CONTROL=none), and is handled then.
"""

# ruff: noqa: E402  (the imports follow the signal mask on purpose)
from __future__ import annotations

import signal

signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

import copy
import logging.config
import sys
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from app.core.service import Service
from app.engine.runtime import usable_manifest
from app.errors import StartupError
from app.http.connections import ConnectionLimits, allow_open_files
from app.http.listen import listening_socket
from app.main import create_app
from app.settings import Settings
from app.supervisor import Supervisor
from app.workers import WorkerGroup, resolve_workers

STARTUP_FAILURE = 3  # uvicorn's own exit code when the app's lifespan fails


def log_config(level: str) -> dict[str, Any]:
    """Uvicorn's logging, plus the service's own logger `app` on the same handler."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["app"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


class DrainingServer(uvicorn.Server):
    """Uvicorn's server, which on the first SIGTERM or SIGINT first turns the app's readiness false.

    Uvicorn re-raises the signal it caught after its graceful shutdown, so that the process dies of it
    (exit status 143 for SIGTERM); a graceful stop is a success here, so it exits 0 instead.
    """

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        if self.service.dataplane is not None:
            self.service.dataplane.drain()
        self.should_exit = True


def main() -> None:
    try:
        settings = Settings.from_env()
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    workers = WorkerGroup.from_env()  # a worker's, as its supervisor started it (WORKERS resolved), or a group of one
    if not workers.shared and (count := resolve_workers(settings.workers)) > 1:
        logging.config.dictConfig(log_config(settings.log_level))
        sys.exit(Supervisor(settings, supervised_group(settings, count)).run())
    serve(settings, workers)


def supervised_group(settings: Settings, count: int) -> WorkerGroup:
    """The supervisor's group of `count` workers, once the model directory looks usable: a missing model stops the
    service with one line here, not with one from each worker."""
    try:
        usable_manifest(settings.model_dir, verify_files=False)  # each worker verifies the files as it loads them
        return WorkerGroup.supervising(count)
    except StartupError as exc:
        reason = str(exc)
    except OSError as exc:  # a read-only file system and no tmpfs for TMPDIR
        reason = f"the worker processes need a writable temporary directory (TMPDIR): {exc.strerror}"
    print(f"cannot start: {reason}", file=sys.stderr)
    sys.exit(STARTUP_FAILURE)


def serve(settings: Settings, workers: WorkerGroup) -> None:
    """Serves the app in this process (alone, or as one of the workers) until SIGTERM."""
    app = create_app(settings, workers=workers)
    try:
        sock = listening_socket(settings.host, settings.port, shared=workers.shared)
    except OSError as exc:
        print(f"cannot start: cannot listen on PORT {settings.port}: {exc.strerror}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        log_config=log_config(settings.log_level),
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        server_header=False,  # no `server: uvicorn` in every response
        loop=settings.event_loop,
        http=ConnectionLimits.of(settings).protocol(settings.http_parser),  # connections; requests: the middleware
    )
    allow_open_files(settings)  # after uvicorn.Config, which configures the logging it may warn on
    server = DrainingServer(config, app.state.service)
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
