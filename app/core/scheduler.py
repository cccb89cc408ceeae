"""Scheduling: inference slots shared by every mode, and the admitted requests waiting for a slot that can run as
one inference run as one.

Each slot takes the oldest request waiting, and with it, up to its BatchingPolicy's rows, every other waiting
request of the same batch key (the same model, mode, and inputs equal in all but the batch dimension), waiting up
to the policy's delay for more; their inputs are stacked, run as one inference, and each gets its own rows of the
outputs back. A batch that fails runs again one request at a time, so that only the request at fault gets the
error. Inference runs on a dedicated executor with as many threads as slots, so the event loop never blocks, except
a run expected to be shorter than the hand-off to a thread would be worth (INLINE_INFERENCE_MS, by the moving
average of its label's runs' duration per row; a label not run yet is not expected to be short): it runs on the
event loop, where a model of microseconds would otherwise spend more time changing threads than computing. A slot is
freed when its run finishes, not when a request gives up, so a timed-out inference still counts against the limit
while it runs. A request whose caller is gone (its task cancelled: the client disconnected, or its gRPC deadline
passed) leaves the queue at once, and never runs; one whose run has started holds its place until the run ends, its
memory being in use until then. The runs' duration and rows, which admission control (app.core.admission) estimates
waits from, are moving averages the scheduler alone writes, on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from app.engine.priority import lower_thread_priority
from app.engine.runtime import Measured, Tensors
from app.engine.timing import Timing
from app.errors import InferenceTimeout
from app.settings import Settings

logger = logging.getLogger("app")
# Weight of the latest run in the moving averages of a run's duration and of its number of rows.
SMOOTHING = 0.1


@dataclass(frozen=True)
class BatchingPolicy:
    """How a model's requests merge: runs of up to max_rows rows (1: each runs alone), a free slot waiting up to
    delay_s for more when its batch is not full."""

    max_rows: int
    delay_s: float = 0.0
    off_because: str | None = None  # why the model never batches, when its rows cannot stack

    @classmethod
    def allowed(cls, settings: Settings, unbatchable: str | None) -> BatchingPolicy:
        """The most the settings and the model allow: BATCHING_MAX_ROWS rows, no more than a request may carry
        (MAX_BATCH_ROWS); none for a model whose rows cannot stack (EnsembleRuntime.unbatchable)."""
        rows = 1 if unbatchable else min(settings.batching_max_rows, settings.max_batch_rows)
        return cls(rows, settings.batching_delay_ms / 1000, unbatchable)

    def at_most(self, rows: int) -> BatchingPolicy:
        """This policy, in runs of `rows` rows at most (auto's choice, or one of its candidates)."""
        return replace(self, max_rows=min(rows, self.max_rows))


@dataclass(frozen=True)
class Batchable:
    """An inference that may merge with others': those of the same key run as one, their feeds stacked, as its
    model's policy allows."""

    key: Hashable
    label: str  # what its runs are counted under (the mode)
    rows: int
    policy: BatchingPolicy
    feeds: Tensors
    infer: Callable[[Tensors], Measured]

    def alone(self) -> Measured:
        return self.infer(self.feeds)


@dataclass(eq=False)
class _Job:
    work: Batchable
    future: asyncio.Future[Measured]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: float = 0.0  # when a slot took it
    started: float = 0.0  # when its run started
    batch_rows: int = 1

    @property
    def rows(self) -> int:
        return self.work.rows


class Scheduler:
    """Use from the event loop only (the queue and the averages are not locked)."""

    def __init__(
        self, slots: int, observe_run: Callable[[str, int], None] | None = None, inline_below_s: float = 0.0
    ) -> None:
        self.slots = slots
        self.observe_run = observe_run  # told the label and rows of every inference run
        self.inline_below_s = inline_below_s  # runs expected to be shorter run on the event loop
        self._service_s: float | None = None
        self._rows_per_run = 1.0
        self._row_s: dict[str, float] = {}  # by label: moving average of a run's duration per row
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(slots, thread_name_prefix="inference", initializer=lower_thread_priority)

    @property
    def service_s(self) -> float | None:
        """Moving average of a run's duration, once one has run or was assumed."""
        return self._service_s

    @property
    def rows_per_run(self) -> float:
        """Moving average of the rows a run serves."""
        return self._rows_per_run

    def assume_run_s(self, seconds: float) -> None:
        """Takes a run to last `seconds` until runs measure it (on a model switch: its warm-up's)."""
        self._service_s = seconds

    @property
    def waiting(self) -> int:
        """Requests queued for a slot (those that gave up included until a slot skips them)."""
        return len(self._queue)

    async def run(self, work: Batchable, timeout_s: float) -> Measured:
        """Runs `work` in an inference slot, waiting for one, possibly as part of a batch: its own rows of the
        outputs, its timing the run's with its wait and batch. InferenceTimeout if waiting and running take over
        timeout_s."""
        self._start_slots()
        job = _Job(work, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):
                measured = await asyncio.shield(job.future)
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
        timing = replace(
            measured.timing,
            queue_s=job.started - job.enqueued,
            batch_wait_s=job.started - job.taken,
            batch_rows=job.batch_rows,
        )
        return Measured(measured.outputs, timing)

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
            started, rows = time.perf_counter(), sum(job.rows for job in jobs)
            for job in jobs:
                job.started, job.batch_rows = started, rows
            label = jobs[0].work.label
            inline = self._row_s.get(label, math.inf) * rows < self.inline_below_s
            if inline:
                results, runs, took_s = _execute(jobs)
            else:
                results, runs, took_s = await loop.run_in_executor(self._executor, _execute, jobs)
            self._fold(label, took_s, rows)
            if len(runs) > 1:  # the batch failed and its jobs ran alone
                for job in jobs:
                    job.batch_rows = job.rows
            if self.observe_run is not None:
                for rows in runs:
                    self.observe_run(label, rows)
            for job, (value, error) in zip(jobs, results, strict=True):
                if job.future.done():  # its request gave up
                    continue
                if error is not None:
                    job.future.set_exception(error)
                else:
                    assert value is not None
                    job.future.set_result(value)
            if inline:
                await asyncio.sleep(0)  # the event loop's other work before this slot's next run

    def _fold(self, label: str, took_s: float, rows: int) -> None:
        """Folds a run's duration and rows into the moving averages (here, on the event loop: their one writer)."""
        previous = self._service_s
        self._service_s = took_s if previous is None else previous + SMOOTHING * (took_s - previous)
        row_s = self._row_s.get(label)
        self._row_s[label] = took_s / rows if row_s is None else row_s + SMOOTHING * (took_s / rows - row_s)
        self._rows_per_run += SMOOTHING * (rows - self._rows_per_run)

    async def _next_batch(self) -> list[_Job]:
        """The oldest waiting request, and the others of its key, up to its policy's rows; waiting up to its delay
        for more when the batch is not full."""
        head = await self._take_head()
        head.taken = time.perf_counter()
        jobs, policy = [head], head.work.policy
        if policy.max_rows <= head.rows:
            return jobs
        deadline = head.taken + policy.delay_s
        while True:
            self._gather(jobs, policy.max_rows)
            remaining = deadline - time.perf_counter()
            if sum(job.rows for job in jobs) >= policy.max_rows or remaining <= 0:
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
        key, rows = jobs[0].work.key, sum(job.rows for job in jobs)
        taken = time.perf_counter()
        for job in list(self._queue):
            if rows >= max_rows:
                break
            if job.work.key == key and not job.future.done() and rows + job.rows <= max_rows:
                self._queue.remove(job)
                job.taken = taken
                jobs.append(job)
                rows += job.rows

    def close(self) -> None:
        for slot in self._slots:
            slot.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


Result = tuple[Measured | None, BaseException | None]


def _execute(jobs: list[_Job]) -> tuple[list[Result], list[int], float]:
    """Runs the jobs as one inference (or the one alone), in an executor thread: (value, error) per job, the rows
    of each inference run, and how long it all took. A merged batch that fails runs again job by job."""
    start = time.perf_counter()
    if len(jobs) > 1:  # jobs gathered with a head are of its key
        try:
            shares = [(share, None) for share in _merged([job.work for job in jobs])]
            return shares, [sum(job.rows for job in jobs)], time.perf_counter() - start
        except Exception:  # one of them is at fault, or the batch as a whole: find out job by job
            logger.warning("a batch of %d requests failed: running them one by one", len(jobs), exc_info=True)
    return [_alone(job.work) for job in jobs], [job.rows for job in jobs], time.perf_counter() - start


def _alone(work: Batchable) -> Result:
    try:
        return work.alone(), None
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
        timing = Timing(inference_s=measured.timing.inference_s, cpu_s=measured.timing.cpu_s * batch.rows / total)
        shares.append(Measured(outputs, timing))
        offset += batch.rows
    return shares
