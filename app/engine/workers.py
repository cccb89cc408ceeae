"""Worker processes (WORKERS > 1): which one this process is, and the directory through which they share state.

The supervisor (app.supervisor) makes a private directory and starts every worker with its index and that
directory in its environment. There each worker keeps
- prometheus-client's multiprocess files (metrics/): counters and histograms summed across workers on a scrape,
  those of dead workers folded into one archive per type by the supervisor (app.observability.metrics.MetricFiles);
- its status (status-<index>.json): its pid and the model it serves, for /readyz and ensemble_model_info;
- its recent latencies (recent-<index>-<mode>.f64, see app.observability.stats), which /stats reads from all;
and, shared: auto's measurement (auto.json, made once by the first worker to take auto.lock, served by all), the
last model command (control.json) that SIGHUP makes every worker apply (and that a replacement follows as it
starts: no model after an unload), and the supervisor's count of workers it replaced (restarts.json).

A process serving alone (WORKERS=1) has no directory: the same object keeps its one status in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ValidationError

from app.engine.resources import WORKERS_ENV, worker_count

INDEX_ENV, DIR_ENV = "ENSEMBLE_WORKER_INDEX", "ENSEMBLE_WORKER_DIR"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when it is imported
METRICS_DIR, AUTO_FILE, CONTROL_FILE, RESTARTS_FILE = "metrics", "auto.json", "control.json", "restarts.json"


class ModelCommand(StrEnum):
    LOAD = "load"
    UNLOAD = "unload"


class WorkerStatus(BaseModel):
    worker: int
    pid: int
    model: str | None = None  # None while loading and once unloaded
    sha256: str | None = None
    info: dict[str, str] = {}  # ensemble_model_info's labels


class Control(BaseModel):
    command: ModelCommand = ModelCommand.LOAD


def worker_environment(directory: Path, index: int, count: int) -> dict[str, str]:
    """What the supervisor adds to a worker's environment."""
    return {
        INDEX_ENV: str(index),
        WORKERS_ENV: str(count),
        DIR_ENV: str(directory),
        MULTIPROCESS_ENV: str(directory / METRICS_DIR),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old text or the new, never half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


class Workers:
    def __init__(self, index: int = 0, count: int = 1, directory: Path | None = None) -> None:
        self.index, self.count, self.directory = index, count, directory
        self._own = WorkerStatus(worker=index, pid=os.getpid())

    @classmethod
    def from_env(cls) -> Workers:
        directory = os.environ.get(DIR_ENV)
        if directory is None:
            return cls()
        return cls(int(os.environ.get(INDEX_ENV, "0")), worker_count(), Path(directory))

    @property
    def shared(self) -> bool:
        """Whether this is one of several worker processes."""
        return self.directory is not None

    @property
    def label(self) -> str:
        return str(self.index)

    def publish(self, status: WorkerStatus) -> None:
        """This worker's status, for /readyz and the metrics of whichever worker answers them."""
        self._own = status
        if self.directory is not None:
            write_atomically(self.directory / f"status-{self.index}.json", status.model_dump_json())

    def statuses(self) -> list[WorkerStatus]:
        """Every live worker's status, by index (this one's only, serving alone)."""
        if self.directory is None:
            return [self._own]
        statuses = []
        for path in sorted(self.directory.glob("status-*.json")):
            try:
                status = WorkerStatus.model_validate_json(path.read_text())
            except (OSError, ValidationError):
                continue
            if _alive(status.pid):
                statuses.append(status)
        return sorted(statuses, key=lambda s: s.worker)

    def recent_file(self, mode: str) -> Path | None:
        """Where this worker keeps its recent latencies of `mode` (None: in memory)."""
        return None if self.directory is None else self._recent_path(self.index, mode)

    def sibling_recent_files(self, modes: Iterable[str]) -> dict[str, list[Path]]:
        """Where the other live workers keep their recent latencies of each mode (none serving alone)."""
        if self.directory is None:
            return {mode: [] for mode in modes}
        siblings = [status.worker for status in self.statuses() if status.worker != self.index]
        return {mode: [self._recent_path(worker, mode) for worker in siblings] for mode in modes}

    def _recent_path(self, worker: int, mode: str) -> Path:
        assert self.directory is not None
        return self.directory / f"recent-{worker}-{mode}.f64"

    @contextlib.contextmanager
    def measuring_once(self) -> Iterator[Path | None]:
        """While held, no other worker measures: yields where auto's measurement is kept (None serving alone)."""
        if self.directory is None:
            yield None
            return
        with open(self.directory / "auto.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.directory / AUTO_FILE
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def command_siblings(self, command: ModelCommand) -> None:
        """Makes every other worker load MODEL_DIR again or unload, as this one just did (through SIGHUP)."""
        if self.directory is None:
            return
        write_atomically(self.directory / CONTROL_FILE, Control(command=command).model_dump_json())
        for status in self.statuses():
            if status.worker != self.index:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(status.pid, signal.SIGHUP)

    def command(self) -> ModelCommand:
        """What a SIGHUP asks of this worker: the last command given to all (load, when none was)."""
        if self.directory is None:
            return ModelCommand.LOAD
        try:
            return Control.model_validate_json((self.directory / CONTROL_FILE).read_text()).command
        except (OSError, ValidationError):
            return ModelCommand.LOAD

    def restarts(self) -> int:
        """Workers the supervisor has replaced since it started."""
        if self.directory is None:
            return 0
        try:
            return int((self.directory / RESTARTS_FILE).read_text())
        except (OSError, ValueError):
            return 0
