"""Admission control: a bounded number of requests in the pipeline, and inference slots shared by every mode.

A request takes a ticket on arrival, refused at once with 503 when slots + queue are all taken or when its
expected wait for a slot (the requests ahead of it / slots x the measured service time) is over the budget,
then waits for one of the inference slots. Inference runs on a dedicated executor with as many threads as
slots, so the event loop never blocks; a slot is freed when the inference thread finishes, not when
the request gives up, so a timed-out inference still counts against the limit while it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.engine.priority import lower_thread_priority
from app.errors import InferenceTimeout, Overloaded

T = TypeVar("T")


@dataclass(frozen=True)
class Admitted(Generic[T]):
    value: T
    waited_s: float  # time spent waiting for a slot


# Weight of the latest inference in the service time's moving average.
SERVICE_TIME_SMOOTHING = 0.1


class Admission:
    """Use from the event loop only (the counters are not locked)."""

    def __init__(self, slots: int, max_queue: int, max_wait_s: float) -> None:
        self.slots = slots
        self.capacity = slots + max_queue
        self.max_wait_s = max_wait_s
        self.admitted = 0
        self.service_s: float | None = None  # moving average of an inference's duration, once one has run
        self._free_slots = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(slots, thread_name_prefix="inference", initializer=lower_thread_priority)

    def expected_wait_s(self) -> float:
        """How long a request admitted now would wait for a slot."""
        ahead = max(0, self.admitted - self.slots + 1)
        return ahead / self.slots * (self.service_s or 0.0)

    def refusal(self) -> Overloaded | None:
        """Why a request arriving now would be refused, if it would be."""
        if self.admitted >= self.capacity:
            return Overloaded(
                f"{self.admitted} requests are already being served or queued (limit {self.capacity}); retry later",
                retry_after_s=self.expected_wait_s() - self.max_wait_s,
            )
        wait = self.expected_wait_s()
        if wait > self.max_wait_s:
            return Overloaded(
                f"a request admitted now would wait {wait * 1000:.0f} ms for an inference slot, more than "
                f"MAX_QUEUE_WAIT_MS ({self.max_wait_s * 1000:.0f}); retry later",
                retry_after_s=wait - self.max_wait_s,  # by then the queue will have room for it
            )
        return None

    @contextmanager
    def ticket(self) -> Iterator[None]:
        refused = self.refusal()
        if refused is not None:
            raise refused
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, work: Callable[[], T], timeout_s: float) -> Admitted[T]:
        """Runs `work` in an inference slot, waiting for one; InferenceTimeout if both take over timeout_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await self._free_slots.acquire()
        except TimeoutError:
            raise InferenceTimeout(f"no inference slot became free within {timeout_s:g} s") from None
        waited_s = time.perf_counter() - started
        future = self._executor.submit(self._timed, work)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free_slots.release))
        try:
            async with asyncio.timeout_at(deadline):
                value = await asyncio.wrap_future(future)
        except TimeoutError:
            raise InferenceTimeout(f"the inference did not finish within {timeout_s:g} s") from None
        return Admitted(value, waited_s)

    def _timed(self, work: Callable[[], T]) -> T:
        """Runs `work` and folds its duration into the service time (a float written whole: safe from any thread)."""
        start = time.perf_counter()
        try:
            return work()
        finally:
            took = time.perf_counter() - start
            previous = self.service_s
            self.service_s = took if previous is None else previous + SERVICE_TIME_SMOOTHING * (took - previous)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
