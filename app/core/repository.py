"""Reloading MODEL_DIR without dropping a request (the Open Inference Protocol's model repository extension).

A load reads MODEL_DIR again, resolving it once (an operator may point a symlink at a new build), verifies it
(checksums, every tensor against the manifest), opens and warms the new sessions beside the old ones, in the
layout the server started with (DEFAULT_MODE=auto times the new model's modes again, in that layout), then
switches: requests already admitted finish on the old sessions, which close after the last of them. A load that
fails leaves the old model serving and says why: in the response, the log and `ensemble_model_loads_total`.
Loads run one at a time (another asked for meanwhile answers 409), and a wrong name is refused before anything
is verified or opened; SIGHUP starts one too. All of it is off unless MODEL_CONTROL=explicit (403 and an ignored
SIGHUP otherwise), as Triton keeps model control off unless asked: a server reachable from the internet must not
let a caller unload its model. With worker processes, a worker started after an unload (one that replaces a dead
worker) starts with no model, as the others serve none.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from functools import lru_cache, partial
from pathlib import Path

import anyio.to_thread
from pydantic import BaseModel

from app.core.auto import SlotLayout
from app.core.dataplane import DataPlane
from app.core.model import LoadedModel, load_model, log_model
from app.errors import BadRequest, Conflict, Forbidden, ModelNotFound, StartupError
from app.observability.metrics import ServiceMetrics
from app.settings import Settings
from app.workers import ModelCommand, WorkerGroup
from ensemble_contract.manifest import load_manifest, sha256_of

logger = logging.getLogger("app")


SIBLINGS_WAIT_S = 120.0  # how long a load or unload through the API waits for the other workers to follow


class ModelState(StrEnum):
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class RepositoryEntry(BaseModel):
    name: str
    version: str = ""
    state: ModelState
    reason: str = ""


class ModelLoad(BaseModel):
    name: str
    sha256: str
    previous_sha256: str | None
    directory: str
    load_seconds: float


class LoadFailed(BadRequest):
    code = "load_failed"


def unchanged_file_sha256(path: Path) -> str:
    """A file's sha256, computed once for as long as its size, modification time and inode stay the same."""
    status = path.stat()
    return _sha256(path.resolve(), status.st_size, status.st_mtime_ns, status.st_ino)


@lru_cache(maxsize=64)  # a few builds' files
def _sha256(path: Path, size: int, mtime_ns: int, inode: int) -> str:
    return sha256_of(path)


class ModelRepository:
    """The one model directory this server serves, loaded, reloaded or unloaded. Use from the event loop."""

    def __init__(self, settings: Settings, dataplane: DataPlane, metrics: ServiceMetrics, workers: WorkerGroup) -> None:
        self.settings = settings
        self.dataplane = dataplane
        self.metrics = metrics
        self.workers = workers
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[ModelLoad | None]] = set()
        if self.workers.command() == ModelCommand.UNLOAD:  # before it serves anything: it serves what the others do
            self.dataplane.switch(None)
            logger.info("no model served: the last command to every worker was an unload (a load serves one again)")

    def check_enabled(self) -> None:
        """Forbidden unless MODEL_CONTROL=explicit: every repository call starts with it."""
        if self.settings.model_control != "explicit":
            raise Forbidden(
                "the model repository calls are off: start the server with MODEL_CONTROL=explicit (and API_KEY) to "
                "load, unload or list models"
            )

    async def index(self) -> list[RepositoryEntry]:
        """The model served, and the one MODEL_DIR holds now if that is another build (not loaded yet). The files
        are checked off the event loop, each hashed once for as long as it is unchanged."""
        self.check_enabled()
        served = self.dataplane.model
        entries = []
        if served is not None:
            entries.append(RepositoryEntry(name=served.manifest.name, state=ModelState.READY))
        try:
            manifest = await anyio.to_thread.run_sync(
                partial(load_manifest, self.settings.model_dir.resolve(), digest=unchanged_file_sha256)
            )
        except Exception as exc:  # ManifestError, or an unreadable directory: what a load would say
            unusable = RepositoryEntry(name=self.settings.model_dir.name, state=ModelState.UNAVAILABLE, reason=str(exc))
            return [*entries, unusable]
        if served is None or manifest.ensemble.sha256 != served.sha256:
            reason = f"MODEL_DIR holds sha256 {manifest.ensemble.sha256[:12]}, not loaded"
            entries.append(RepositoryEntry(name=manifest.name, state=ModelState.UNAVAILABLE, reason=reason))
        return entries

    async def load(self, name: str | None = None) -> ModelLoad:
        """Loads what MODEL_DIR holds now and serves it; with a name, only if the model there has that name.
        LoadFailed (the old model still serving) if it cannot be loaded. A caller that goes away does not
        cancel a load half-way: it completes (or fails) all the same. Conflict while another load runs. With
        worker processes, the others then load it too, and it returns once they serve it (or SIBLINGS_WAIT_S)."""
        self.check_enabled()
        if self._lock.locked():
            raise Conflict("a model load is already running: retry when it has finished (GET /readyz says which)")
        loaded = await asyncio.shield(self._load(name))
        self.workers.command_siblings(ModelCommand.LOAD)
        await self._siblings_serve(loaded.sha256)
        return loaded

    async def _siblings_serve(self, sha256: str | None) -> None:
        deadline = time.perf_counter() + SIBLINGS_WAIT_S
        while any(status.sha256 != sha256 for status in self.workers.statuses()):
            if time.perf_counter() > deadline:
                logger.warning("not every worker serves sha256 %s yet: GET /readyz lists each one's", sha256)
                return
            await asyncio.sleep(0.05)

    async def _load(self, name: str | None) -> ModelLoad:
        async with self._lock:
            started = time.perf_counter()
            previous = self.dataplane.model
            slots = self.dataplane.scheduler.slots
            if name is not None:  # the cheap refusal first: the manifest's name, before any file is verified
                await self._check_name(name, previous)
            try:
                layout = SlotLayout.on(self.workers.cores.share, slots)
                model = await anyio.to_thread.run_sync(load_model, self.settings, self.workers, layout)
            except StartupError as exc:
                raise self._failed(str(exc), previous) from None
            except Exception as exc:  # not one of ours: the traceback goes to the log
                logger.exception("loading MODEL_DIR failed")
                raise self._failed(f"{type(exc).__name__}: {exc}", previous) from None
            if name is not None and model.manifest.name != name:  # the directory changed while it was loading
                model.retire()
                raise self._failed(f"MODEL_DIR holds model {model.manifest.name!r}, not {name!r}", previous)
            self.dataplane.switch(model)
            self.metrics.model_loads.labels("ok").inc()
            log_model(model, self.settings, self.workers.cores)
            return ModelLoad(
                name=model.manifest.name,
                sha256=model.sha256,
                previous_sha256=previous.sha256 if previous else None,
                directory=str(model.directory),
                load_seconds=round(time.perf_counter() - started, 3),
            )

    async def _check_name(self, name: str, serving: LoadedModel | None) -> None:
        """LoadFailed unless the manifest in MODEL_DIR names the model `name` (read, not verified: the load
        verifies what it opens)."""
        try:
            manifest = await anyio.to_thread.run_sync(
                partial(load_manifest, self.settings.model_dir.resolve(), verify_files=False)
            )
        except Exception as exc:  # ManifestError, or an unreadable directory
            raise self._failed(str(exc), serving) from None
        if manifest.name != name:
            raise self._failed(f"MODEL_DIR holds model {manifest.name!r}, not {name!r}", serving)

    def _failed(self, reason: str, serving: LoadedModel | None) -> LoadFailed:
        self.metrics.model_loads.labels("failed").inc()
        still = f"still serving sha256 {serving.sha256[:12]}" if serving else "no model is served"
        message = f"cannot load MODEL_DIR ({self.settings.model_dir}): {reason}; {still}"
        logger.error("%s", message)
        return LoadFailed(message)

    async def unload(self, name: str) -> None:
        """Stops serving the model `name`: readiness turns false and inference requests get 503 until a load; with
        worker processes, in every one."""
        self.check_enabled()
        await self._unload(name)
        self.workers.command_siblings(ModelCommand.UNLOAD)
        await self._siblings_serve(None)

    async def _unload(self, name: str | None) -> None:
        async with self._lock:
            served = self.dataplane.model
            if served is None or (name is not None and served.manifest.name != name):
                raise ModelNotFound(f"model {name!r} is not loaded")
            self.dataplane.switch(None)
            logger.info("unloaded %s (sha256 %s)", served.manifest.name, served.sha256[:12])

    @contextmanager
    def reloading_on_sighup(self) -> Iterator[None]:
        """SIGHUP loads MODEL_DIR again while the block runs (with worker processes: does what the last command to
        all workers said, load or unload), or is logged and ignored with MODEL_CONTROL=none (in the main thread
        only: Python's signals are delivered there; a server run in another thread, as in the tests, has no SIGHUP
        handler). Outside the block SIGHUP stays blocked (app.__main__ blocks it as the process starts): one that
        arrived while the model loaded is handled as the block starts, one during the shutdown never."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        enabled = self.settings.model_control == "explicit"
        loop.add_signal_handler(signal.SIGHUP, self._load_in_background if enabled else self._ignore_sighup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            loop.remove_signal_handler(signal.SIGHUP)

    @staticmethod
    def _ignore_sighup() -> None:
        logger.warning("SIGHUP ignored: model control is off (MODEL_CONTROL=none)")

    def _load_in_background(self) -> None:
        if self._lock.locked():
            logger.warning("SIGHUP ignored: a model load is already running")
            return
        command = self.workers.command()
        logger.info("SIGHUP: %s", "loading MODEL_DIR again" if command == ModelCommand.LOAD else "unloading")
        follow = self._load(None) if command == ModelCommand.LOAD else self._unload(None)
        task = asyncio.get_running_loop().create_task(follow)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[ModelLoad | None]) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is not None:
            return  # a LoadFailed was logged and counted by the load itself; an unload of nothing changed nothing
        logger.info("SIGHUP: now serving %s", f"sha256 {task.result().sha256[:12]}" if task.result() else "nothing")
