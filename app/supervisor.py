"""WORKERS > 1: the process that starts the worker processes, replaces those that die, and passes signals on.

Each worker is `python -m app` again, with its index and the workers' directory in its environment (app.workers,
whose WorkerGroup is the supervisor's view of the group too): it binds the same HTTP, METRICS_PORT and GRPC_PORT
ports with sockets of its own (SO_REUSEPORT), loads its own sessions on its share of the cores and runs its own
admission control. The supervisor loads no model and serves nothing.

- SIGTERM or SIGINT: passed to every worker, which drains as a lone server does (readiness false at once, requests
  in flight get SHUTDOWN_GRACE_S); a worker still running WORKER_EXIT_S after that is killed. Exits 0.
- SIGHUP: every worker loads MODEL_DIR again (MODEL_CONTROL=explicit; otherwise each logs that it ignores it).
  Workers start with SIGHUP blocked, so one sent while a worker starts waits until it can apply it (app.__main__).
- A worker that exits on its own is replaced (counted in ensemble_worker_restarts_total), after RESTART_DELAY_S,
  doubling while its replacements keep failing (up to MAX_RESTART_DELAY_S: say MODEL_DIR now holds a broken
  build, and the other workers serve on). If no worker has served yet, the model or a port cannot be had: the
  supervisor stops the others and exits with the failed worker's status. Its counters and histograms are folded
  into the metric files' archive (MetricFiles), so that they stay in the sums and the directory stays bounded.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

from app.observability.metrics import MetricFiles
from app.settings import Settings
from app.workers import ModelCommand, WorkerGroup

logger = logging.getLogger("app.supervisor")

WORKER_EXIT_S = 5.0  # beyond SHUTDOWN_GRACE_S, before a worker that has not exited is killed
RESTART_DELAY_S = 1.0  # between a worker's death and its replacement: a crash loop costs little
MAX_RESTART_DELAY_S = 30.0
POLL_S = 0.1


@dataclass
class WorkerProcess:
    index: int
    process: subprocess.Popen[bytes]
    ready: bool = False  # it has published a status: its model is loaded and it serves


class Supervisor:
    def __init__(self, settings: Settings, workers: WorkerGroup) -> None:
        """Supervises `workers` (its view of them: WorkerGroup.supervising), whose directory it removes at the end."""
        assert workers.metrics_dir is not None
        self.settings, self.workers = settings, workers
        self.metric_files = MetricFiles(workers.metrics_dir)
        self.unfolded: set[int] = set()  # dead workers' pids whose metric files are not folded yet (a scrape read)
        self.processes: dict[int, WorkerProcess] = {}
        self.replacing: dict[int, float] = {}  # worker index -> when to start its replacement
        self.failures: dict[int, int] = {}  # worker index -> replacements in a row that died before serving
        self.served = False  # some worker has served
        self.stopping: float | None = None  # when SIGTERM arrived
        # Signals received, acted on by the main loop: a handler may interrupt any statement, another handler's too.
        self.signals: deque[int] = deque()
        self.exit_status = 0

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # blocked since the process started: handled now
        per_worker = self.settings.inference_slots + self.settings.max_queue
        logger.info(
            "%d worker processes, cores %s; at most %d requests admitted at once (workers x "
            "(INFERENCE_SLOTS + MAX_QUEUE))",
            self.workers.count,
            self.workers.cores.describe(),  # each worker's share included
            self.workers.count * per_worker,
        )
        try:
            for index in range(self.workers.count):
                self._start(index)
            while self.processes or (self.replacing and self.stopping is None):
                self._handle_signals()
                self._reap()
                self._fold()
                self._replace()
                time.sleep(POLL_S)
        finally:
            self.workers.remove()
        return self.exit_status

    def _start(self, index: int) -> None:
        environment = os.environ | self.workers.environment(index)
        # The child inherits the signal mask, through the exec: a SIGHUP that reaches it before it has a handler
        # stays pending instead of killing it, until its repository applies it (app.core.repository).
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process = subprocess.Popen([sys.executable, "-m", "app"], env=environment)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        self.processes[index] = WorkerProcess(index, process)

    def _reap(self) -> None:
        starting = any(not worker.ready for worker in self.processes.values())
        statuses = {s.worker: s.pid for s in self.workers.statuses()} if starting else {}
        for worker in list(self.processes.values()):
            if not worker.ready and statuses.get(worker.index) == worker.process.pid:
                worker.ready = self.served = True
            status = worker.process.poll()
            if status is None:
                if self.stopping is not None and time.monotonic() > self.stopping + self._drain_s():
                    worker.process.kill()
                continue
            del self.processes[worker.index]
            self.unfolded.add(worker.process.pid)
            if self.stopping is not None:
                continue
            if not self.served:
                logger.error("worker %d exited with status %d before any served: stopping", worker.index, status)
                self.exit_status = status or 1
                self._stop_all()
                continue
            failures = 0 if worker.ready else self.failures.get(worker.index, 0) + 1
            self.failures[worker.index] = failures
            delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2**failures)
            pid = worker.process.pid
            logger.error(
                "worker %d (pid %d) exited with status %d: replacing it in %g s", worker.index, pid, status, delay
            )
            self.replacing[worker.index] = time.monotonic() + delay

    def _replace(self) -> None:
        for index, due in list(self.replacing.items()):
            if self.stopping is not None:
                del self.replacing[index]
            elif time.monotonic() >= due:
                del self.replacing[index]
                self.workers.count_restart()
                self._start(index)

    def _fold(self) -> None:
        """Dead workers' counters and histograms join the archive, their live gauges leave the scrape (a fold that a
        scrape holds off is tried again at the next poll)."""
        self.unfolded = {pid for pid in self.unfolded if not self.metric_files.fold_dead(pid)}

    def _drain_s(self) -> float:
        return self.settings.shutdown_grace_s + WORKER_EXIT_S

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.signals.append(sig)

    def _handle_signals(self) -> None:
        """The signals received since the last poll, in their order; SIGHUP once, however many arrived."""
        hangup = False
        while self.signals:
            sig = self.signals.popleft()
            if sig == signal.SIGHUP:
                hangup = True
            elif self.stopping is not None and sig == signal.SIGINT:  # Ctrl-C twice: stop now
                self._signal_all(signal.SIGKILL)
            else:
                logger.info("%s: stopping %d workers", signal.Signals(sig).name, len(self.processes))
                self._stop_all()
        if hangup:
            self.workers.give(ModelCommand.LOAD)
            self._signal_all(signal.SIGHUP)

    def _stop_all(self) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for worker in self.processes.values():
            if worker.process.poll() is None:
                worker.process.send_signal(sig)
