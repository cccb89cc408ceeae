"""Admission control: a bounded number of requests in the pipeline, each refused at once rather than left to wait
longer than the budget.

A request takes a ticket on arrival, refused at once with 503 when slots + queue are all taken or when its
expected wait for a slot is over the budget: the runs ahead of it (the rows of the requests ahead and its own, in
batches of the measured size) / slots x a run's measured duration, so that a big request pays for its size. The
admitted requests then run as the scheduler (app.core.scheduler) schedules them; the run's duration and rows are
its measurements, which admission only reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.core.scheduler import Scheduler
from app.errors import Overloaded


class Admission:
    """Use from the event loop only (the counters are not locked)."""

    def __init__(
        self,
        scheduler: Scheduler,
        max_queue: int,
        max_wait_s: float,
        report_admitted: Callable[[int], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.report_admitted = report_admitted  # told the requests admitted whenever they change (a gauge's set)
        self.capacity = scheduler.slots + max_queue
        self.max_wait_s = max_wait_s
        self.admitted = 0
        self.admitted_rows = 0

    def expected_wait_s(self, rows: int = 1) -> float:
        """How long a request of `rows` rows admitted now would wait for its run to end: the rows ahead of it and
        its own beyond what the slots take at once, in runs of the measured size, slots at a time."""
        slots, rows_per_run = self.scheduler.slots, self.scheduler.rows_per_run
        ahead = max(0.0, self.admitted_rows + rows - slots * rows_per_run)
        return ahead / rows_per_run / slots * (self.scheduler.service_s or 0.0)

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
