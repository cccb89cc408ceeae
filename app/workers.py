"""The worker processes (WORKERS > 1) as one group: how many there are, the directory they share, and every file in
it, each written and read through WorkerGroup, by the workers and by their supervisor (app.supervisor) alike.

The supervisor makes the directory (`WorkerGroup.supervising`) and starts every worker with its index, the count
and the directory in its environment (`environment`), from which the worker takes its own view (`from_env`).
There each worker keeps
- prometheus-client's multiprocess files (metrics/): counters and histograms summed across workers on a scrape,
  those of dead workers folded into one archive per type by the supervisor (app.observability.metrics.MetricFiles);
- its status (status-<index>.json): its pid and the model it serves, for /readyz and ensemble_model_info;
- its recent latencies (recent-<index>-<mode>.f64, see app.observability.stats), which /stats reads from all;
- its row of the group's load (load.i64, GroupLoad): the inferences it runs now, and how many ran alone or shared;
and, shared: auto's measurement (auto.json, made once by the first worker to take auto.lock, served by all), the
last model command (control.json) that SIGHUP makes every worker apply (and that a replacement follows as it
starts: no model after an unload), and the supervisor's count of workers it replaced (restarts.json).

A process serving alone (WORKERS=1) is a group of one without a directory: its one status is kept in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from enum import IntEnum, StrEnum
from functools import cached_property
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ValidationError

from app.engine.resources import MIB, CoreCount, usable_cores, usable_memory

INDEX_ENV, COUNT_ENV, DIR_ENV = "ENSEMBLE_WORKER_INDEX", "ENSEMBLE_WORKERS", "ENSEMBLE_WORKER_DIR"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client when it is imported
METRICS_DIR, AUTO_FILE, CONTROL_FILE, RESTARTS_FILE = "metrics", "auto.json", "control.json", "restarts.json"
LOAD_FILE = "load.i64"
WORKER_MEMORY_BYTES = 512 * MIB  # WORKERS=auto: at most one worker per this much memory


def resolve_workers(setting: int | str) -> int:
    """WORKERS as a number: auto is one per usable core, at most one per WORKER_MEMORY_BYTES of usable memory."""
    if setting != "auto":
        return int(setting)
    return max(1, min(usable_cores().count, usable_memory().bytes // WORKER_MEMORY_BYTES))


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


class LoadCell(IntEnum):
    """The columns of a worker's row in GroupLoad."""

    RUNNING = 0  # inferences it runs now
    ALONE = 1  # inferences it ran while no other ran in the group
    SHARED = 2  # inferences it ran beside others


class GroupLoad:
    """How many inferences the worker group runs now, and how many ran alone or beside others: one row of int64
    cells per worker (in load.i64, or in memory serving alone), each row written by its worker only (its inference
    threads one at a time) and summed by anyone. An inference that starts while no other runs anywhere in the group
    runs alone: app.core.model gives it every core rather than its worker's share. Two workers starting at the same
    instant may both see themselves alone; they then share the cores for one run, which costs time, not results."""

    def __init__(self, cells: np.ndarray, row: int | None) -> None:
        self._cells, self._row = cells, row
        self._lock = threading.Lock()
        if row is not None:  # a replacement takes over a dead worker's row: nothing of its own runs yet
            cells[row, LoadCell.RUNNING] = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[bool]:
        """While held, this worker runs one more inference; yields whether it is the only one in the group."""
        assert self._row is not None, "the supervisor runs no inference"
        with self._lock:
            self._cells[self._row, LoadCell.RUNNING] += 1
            alone = self.running_now() == 1
        try:
            yield alone
        finally:
            with self._lock:
                self._cells[self._row, LoadCell.RUNNING] -= 1
                self._cells[self._row, LoadCell.ALONE if alone else LoadCell.SHARED] += 1

    def running_now(self) -> int:
        """Inferences running in the group now."""
        return int(self._cells[:, LoadCell.RUNNING].sum())

    def ran(self, cell: LoadCell) -> int:
        """Inferences the group ran alone (LoadCell.ALONE) or beside others (SHARED) since it started."""
        return int(self._cells[:, cell].sum())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old text or the new, never half of it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


class WorkerGroup:
    """One process's view of its group: a worker's (`index`: which one it is), or the supervisor's (`index` None:
    it serves nothing, publishes no status and reads every worker's)."""

    def __init__(self, count: int = 1, directory: Path | None = None, index: int | None = 0) -> None:
        self.count, self.directory, self.index = count, directory, index
        self.metrics_dir = None if directory is None else directory / METRICS_DIR
        self._own = WorkerStatus(worker=index or 0, pid=os.getpid())
        self._restarts = 0

    @classmethod
    def from_env(cls) -> WorkerGroup:
        """A worker's view, from the environment its supervisor gave it; a group of one otherwise."""
        directory = os.environ.get(DIR_ENV)
        if directory is None:
            return cls()
        return cls(int(os.environ[COUNT_ENV]), Path(directory), int(os.environ[INDEX_ENV]))

    @classmethod
    def supervising(cls, count: int) -> WorkerGroup:
        """The supervisor's view of a new group of `count` workers, in a private directory it makes (`remove` it)."""
        directory = Path(tempfile.mkdtemp(prefix="ensemble-workers-"))
        (directory / METRICS_DIR).mkdir()
        np.zeros((count, len(LoadCell)), dtype=np.int64).tofile(directory / LOAD_FILE)
        return cls(count, directory, index=None)

    def environment(self, index: int) -> dict[str, str]:
        """What the supervisor adds to worker `index`'s environment."""
        assert self.directory is not None and self.metrics_dir is not None
        return {
            INDEX_ENV: str(index),
            COUNT_ENV: str(self.count),
            DIR_ENV: str(self.directory),
            MULTIPROCESS_ENV: str(self.metrics_dir),
        }

    def remove(self) -> None:
        """The supervisor's last act: the directory goes, with everything the workers kept in it."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def shared(self) -> bool:
        """Whether this is one of several worker processes (or their supervisor)."""
        return self.directory is not None

    @property
    def label(self) -> str:
        """This worker's index as a metric label."""
        return str(self.index)

    @cached_property
    def load(self) -> GroupLoad:
        """The group's load: this worker's row to write (none for the supervisor), every row to read."""
        if self.directory is None:
            return GroupLoad(np.zeros((1, len(LoadCell)), dtype=np.int64), 0)
        cells = np.memmap(self.directory / LOAD_FILE, dtype=np.int64, mode="r+", shape=(self.count, len(LoadCell)))
        return GroupLoad(cells, self.index)

    @property
    def cores(self) -> CoreCount:
        """The cores the workers share: each sizes its sessions, layouts and thread pools by its `share`."""
        return dataclasses.replace(usable_cores(), workers=self.count)

    def publish(self, model: str | None = None, sha256: str | None = None, info: dict[str, str] | None = None) -> None:
        """This worker's status (no model: loading, or unloaded), for /readyz and the metrics of whichever worker
        answers them, and for the supervisor (a worker that published one serves)."""
        assert self.index is not None, "the supervisor serves nothing"
        self._own = WorkerStatus(worker=self.index, pid=os.getpid(), model=model, sha256=sha256, info=info or {})
        if self.directory is not None:
            _write_atomically(self.directory / f"status-{self.index}.json", self._own.model_dump_json())

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
        if self.directory is None:
            return None
        assert self.index is not None, "the supervisor keeps no latencies"
        return self._recent_path(self.index, mode)

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
    def measuring_once(self) -> Iterator[None]:
        """While held, no other worker measures (or reads what one measured: `measurement`)."""
        if self.directory is None:
            yield
            return
        with open(self.directory / "auto.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def measurement(self) -> str | None:
        """What a worker kept of auto's measurement (None: none has measured, or serving alone)."""
        if self.directory is None or not (self.directory / AUTO_FILE).exists():
            return None
        return (self.directory / AUTO_FILE).read_text()

    def keep_measurement(self, text: str) -> None:
        """Auto's measurement, for the workers that start after this one (within `measuring_once`)."""
        if self.directory is not None:
            _write_atomically(self.directory / AUTO_FILE, text)

    def give(self, command: ModelCommand) -> None:
        """Records `command` as the last given to every worker: what a SIGHUP makes each apply, and a replacement
        follows as it starts."""
        if self.directory is not None:
            _write_atomically(self.directory / CONTROL_FILE, Control(command=command).model_dump_json())

    def command_siblings(self, command: ModelCommand) -> None:
        """Makes every other worker load MODEL_DIR again or unload, as this one just did (through SIGHUP)."""
        if self.directory is None:
            return
        self.give(command)
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

    def count_restart(self) -> None:
        """The supervisor replaced a worker (counted in ensemble_worker_restarts_total)."""
        assert self.directory is not None
        self._restarts += 1
        _write_atomically(self.directory / RESTARTS_FILE, str(self._restarts))

    def restarts(self) -> int:
        """Workers the supervisor has replaced since it started."""
        if self.directory is None:
            return 0
        try:
            return int((self.directory / RESTARTS_FILE).read_text())
        except (OSError, ValueError):
            return 0
