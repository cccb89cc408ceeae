"""Admission control and batching: a bounded number of requests in the pipeline, inference slots shared by every
mode, and the requests waiting for a slot that can run as one inference run as one.

A request takes a ticket on arrival, refused at once with 503 when slots + queue are all taken or when its
expected wait for a slot is over the budget: the runs ahead of it (the rows of the requests ahead and its own, in
batches of the measured size) / slots x a run's measured duration, so that a big request pays for its size. It
then joins the queue. Each slot takes the oldest request waiting, and with it, up to BATCHING_MAX_ROWS rows, every
other waiting request of the same batch key (the same model, mode, and inputs equal in all but the batch
dimension), waiting up to BATCHING_DELAY_MS for more; their inputs are stacked, run as one inference, and each
gets its own rows of the outputs back. A batch that fails runs again one request at a time, so that only the
request at fault gets the error. Inference runs on a dedicated executor with as many threads as slots, so the event
loop never blocks; a slot is freed when its run finishes, not when a request gives up, so a timed-out inference
still counts against the limit while it runs. A request whose caller is gone (its task cancelled: the client
disconnected, or its gRPC deadline passed) leaves the queue at once, and never runs; one whose run has started
holds its place until the run ends, its memory being in use until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

import numpy as np

from app.engine.priority import lower_thread_priority
from app.engine.runtime import Measured, Tensors
from app.errors import InferenceTimeout, Overloaded

T = TypeVar("T")
logger = logging.getLogger("app")
# Weight of the latest run in the moving averages of a run's duration and of its number of rows.
SMOOTHING = 0.1


@dataclass(frozen=True)
class Batchable:
    """An inference that may merge with others': those of the same key run as one, their feeds stacked, up to
    max_rows rows (1: it runs alone)."""

    key: Hashable
    label: str  # what its runs are counted under (the mode)
    rows: int
    max_rows: int
    feeds: Tensors
    infer: Callable[[Tensors], Measured]

    def alone(self) -> Measured:
        return self.infer(self.feeds)


@dataclass(frozen=True)
class Admitted(Generic[T]):
    value: T
    waited_s: float  # from joining the queue until its run started: waiting for a slot, and for its batch
    batch_wait_s: float = 0.0  # the part of it spent gathering the batch once a slot was free
    batch_rows: int = 1  # rows of the run it was part of (1 for a request that ran alone)


@dataclass(eq=False)
class _Job:
    work: Callable[[], Any]  # the request alone (also its fallback when its batch fails)
    batch: Batchable | None  # None: work that never merges
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: float = 0.0  # when a slot took it
    started: float = 0.0  # when its run started
    batch_rows: int = 1

    @property
    def rows(self) -> int:
        return self.batch.rows if self.batch is not None else 1


class Admission:
    """Use from the event loop only (the counters are not locked)."""

    def __init__(
        self,
        slots: int,
        max_queue: int,
        max_wait_s: float,
        batch_delay_s: float = 0.0,
        observe_run: Callable[[str, int], None] | None = None,
        report_admitted: Callable[[int], None] | None = None,
    ) -> None:
        self.slots = slots
        self.observe_run = observe_run  # told the label and rows of every inference of Batchables
        self.report_admitted = report_admitted  # told the requests admitted whenever they change (a gauge's set)
        self.capacity = slots + max_queue
        self.max_wait_s = max_wait_s
        self.batch_delay_s = batch_delay_s
        self.admitted = 0
        self.admitted_rows = 0
        self.service_s: float | None = None  # moving average of a run's duration, once one has run
        self.rows_per_run = 1.0  # moving average of the rows a run serves
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(slots, thread_name_prefix="inference", initializer=lower_thread_priority)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot (those that gave up included until a slot skips them)."""
        return len(self._queue)

    def expected_wait_s(self, rows: int = 1) -> float:
        """How long a request of `rows` rows admitted now would wait for its run to end: the rows ahead of it and
        its own beyond what the slots take at once, in runs of the measured size, slots at a time."""
        ahead = max(0.0, self.admitted_rows + rows - self.slots * self.rows_per_run)
        return ahead / self.rows_per_run / self.slots * (self.service_s or 0.0)

    def refusal(self, rows: int = 1) -> Overloaded | None:
        """Why a request of `rows` rows arriving now would be refused, if it would be."""
        if self.admitted >= self.capacity:
            return Overloaded(
                f"{self.admitted} requests are already being served or queued (limit {self.capacity}); retry later",
                retry_after_s=self.expected_wait_s(rows) - self.max_wait_s,
            )
        wait = self.expected_wait_s(rows)
        if wait > self.max_wait_s:
            return Overloaded(
                f"a request admitted now would wait {wait * 1000:.0f} ms for an inference slot, more than "
                f"MAX_QUEUE_WAIT_MS ({self.max_wait_s * 1000:.0f}); retry later",
                retry_after_s=wait - self.max_wait_s,  # by then the queue will have room for it
            )
        return None

    @contextmanager
    def ticket(self, rows: int = 1) -> Iterator[None]:
        refused = self.refusal(rows)
        if refused is not None:
            raise refused
        self._admit(1, rows)
        try:
            yield
        finally:
            self._admit(-1, -rows)

    def _admit(self, requests: int, rows: int) -> None:
        self.admitted += requests
        self.admitted_rows += rows
        if self.report_admitted is not None:
            self.report_admitted(self.admitted)

    @overload
    async def run(self, work: Batchable, timeout_s: float) -> Admitted[Measured]: ...
    @overload
    async def run(self, work: Callable[[], T], timeout_s: float) -> Admitted[T]: ...
    async def run(self, work: Batchable | Callable[[], T], timeout_s: float) -> Admitted[Any]:
        """Runs `work` in an inference slot, waiting for one; a Batchable possibly as part of a batch, its value the
        Measured of its own rows. InferenceTimeout if waiting and running take over timeout_s."""
        loop = asyncio.get_running_loop()
        self._start_slots()
        if isinstance(work, Batchable):
            job = _Job(work.alone, work, loop.create_future())
        else:
            job = _Job(work, None, loop.create_future())
        self._queue.append(job)
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):
                value = await asyncio.shield(job.future)
        except TimeoutError:
            if not job.started:
                self._withdraw(job)
                raise InferenceTimeout(f"no inference slot became free within {timeout_s:g} s") from None
            raise InferenceTimeout(f"the inference did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:  # the caller is gone
            if not job.started:
                self._withdraw(job)
            else:  # its arrays are in use until the run ends: so is its reservation, released when this returns
                await asyncio.wait([job.future])
            raise
        return Admitted(value, job.started - job.enqueued, job.started - job.taken, job.batch_rows)

    def _withdraw(self, job: _Job) -> None:
        """A job nobody waits for any more leaves the queue now (or the batch being gathered, which drops it)."""
        job.future.cancel()
        with contextlib.suppress(ValueError):  # a slot took it already: that slot's batch leaves it out
            self._queue.remove(job)

    def _start_slots(self) -> None:
        if not self._slots:
            self._slots = [asyncio.create_task(self._serve(), name=f"inference-slot-{i}") for i in range(self.slots)]

    async def _serve(self) -> None:
        """One slot: takes the next batch, runs it in the executor, hands each request its result."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = [job for job in await self._next_batch() if not job.future.done()]  # not withdrawn meanwhile
            if not jobs:
                continue
            started = time.perf_counter()
            for job in jobs:
                job.started, job.batch_rows = started, sum(j.rows for j in jobs)
            results, runs = await loop.run_in_executor(self._executor, self._execute, jobs)
            if len(runs) > 1:  # the batch failed and its jobs ran alone
                for job in jobs:
                    job.batch_rows = job.rows
            head = jobs[0].batch
            if head is not None and self.observe_run is not None:
                for rows in runs:
                    self.observe_run(head.label, rows)
            for job, (value, error) in zip(jobs, results, strict=True):
                if job.future.done():  # its request gave up
                    continue
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(value)

    async def _next_batch(self) -> list[_Job]:
        """The oldest waiting request, and the others of its key, up to its key's rows; waiting up to batch_delay_s
        for more when the batch is not full."""
        head = await self._take_head()
        head.taken = time.perf_counter()
        jobs = [head]
        if head.batch is None or head.batch.max_rows <= head.batch.rows:
            return jobs
        deadline, max_rows = head.taken + self.batch_delay_s, head.batch.max_rows
        while True:
            self._gather(jobs, max_rows)
            remaining = deadline - time.perf_counter()
            if sum(job.rows for job in jobs) >= max_rows or remaining <= 0:
                return jobs
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):  # then the loop gathers what came meanwhile, and returns
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    async def _take_head(self) -> _Job:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            job = self._queue.popleft()
            if not job.future.done():  # not given up while it waited
                return job

    def _gather(self, jobs: list[_Job], max_rows: int) -> None:
        """Moves the waiting requests of the first job's key into `jobs`, oldest first, while their rows fit."""
        key, rows = jobs[0].batch.key if jobs[0].batch else None, sum(job.rows for job in jobs)
        taken = time.perf_counter()
        for job in list(self._queue):
            if rows >= max_rows:
                break
            same = job.batch is not None and job.batch.key == key and not job.future.done()
            if same and rows + job.rows <= max_rows:
                self._queue.remove(job)
                job.taken = taken
                jobs.append(job)
                rows += job.rows

    def _execute(self, jobs: list[_Job]) -> tuple[list[tuple[Any, BaseException | None]], list[int]]:
        """Runs the jobs as one inference (or the one alone), in an executor thread: (value, error) per job, and the
        rows of each inference run. A merged batch that fails runs again job by job. Folds the run's duration and
        rows into the moving averages (floats written whole: safe from any thread)."""
        start = time.perf_counter()
        try:
            batches = [job.batch for job in jobs if job.batch is not None]
            if len(batches) > 1:  # jobs gathered with a head are of its key, so all have one
                try:
                    return [(share, None) for share in _merged(batches)], [sum(b.rows for b in batches)]
                except Exception:  # one of them is at fault, or the batch as a whole: find out job by job
                    logger.warning("a batch of %d requests failed: running them one by one", len(jobs), exc_info=True)
            return [_alone(job) for job in jobs], [job.rows for job in jobs]
        finally:
            took = time.perf_counter() - start
            previous = self.service_s
            self.service_s = took if previous is None else previous + SMOOTHING * (took - previous)
            self.rows_per_run += SMOOTHING * (sum(job.rows for job in jobs) - self.rows_per_run)

    def close(self) -> None:
        for slot in self._slots:
            slot.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _alone(job: _Job) -> tuple[Any, BaseException | None]:
    try:
        return job.work(), None
    except Exception as error:
        return None, error


def _merged(batches: list[Batchable]) -> list[Measured]:
    """The requests' feeds stacked along the batch axis, run once, and each request's rows of the outputs (its share
    of the CPU time by rows; the run's duration, which it waited through)."""
    stacked = {name: np.concatenate([batch.feeds[name] for batch in batches]) for name in batches[0].feeds}
    measured = batches[0].infer(stacked)
    total = sum(batch.rows for batch in batches)
    uneven = [name for name, array in measured.outputs.items() if array.shape[:1] != (total,)]
    if uneven:
        raise ValueError(f"outputs {uneven} do not have one row per input row")
    shares, offset = [], 0
    for batch in batches:
        rows = slice(offset, offset + batch.rows)
        outputs = {name: array[rows] for name, array in measured.outputs.items()}
        shares.append(Measured(outputs, measured.cpu_s * batch.rows / total, measured.seconds))
        offset += batch.rows
    return shares
