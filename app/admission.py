"""Admission control: a bounded number of requests in the pipeline, and inference slots shared by every mode.

A request takes a ticket on arrival (refused at once with 503 when slots + queue are all taken), then
waits for one of the inference slots. Inference runs on a dedicated executor with as many threads as
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

from app.errors import InferenceTimeout, Overloaded
from app.priority import lower_thread_priority

T = TypeVar("T")


@dataclass(frozen=True)
class Admitted(Generic[T]):
    value: T
    waited_s: float  # time spent waiting for a slot


class Admission:
    """Use from the event loop only (the counters are not locked)."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.slots = slots
        self.capacity = slots + max_queue
        self.admitted = 0
        self._free_slots = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(slots, thread_name_prefix="inference", initializer=lower_thread_priority)

    @contextmanager
    def ticket(self) -> Iterator[None]:
        if self.admitted >= self.capacity:
            raise Overloaded(
                f"{self.admitted} requests are already being served or queued (limit {self.capacity}); retry later"
            )
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
        future = self._executor.submit(work)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._free_slots.release))
        try:
            async with asyncio.timeout_at(deadline):
                value = await asyncio.wrap_future(future)
        except TimeoutError:
            raise InferenceTimeout(f"the inference did not finish within {timeout_s:g} s") from None
        return Admitted(value, waited_s)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
