"""The memory this process may use, and what the requests in flight hold of it.

Every request takes a lease on the server's memory budget (MEMORY_BUDGET_BYTES, by default half of what the
process may use beyond what the loaded model and its largest request's arena hold) and reserves, before the work
that needs it, what it will hold: its body as it arrives, the objects its JSON becomes, its tensors, ONNX
Runtime's working memory for its rows, its encoded response. A reservation over MAX_REQUEST_BYTES is refused with
413, one that would take the budget past its total with 503 and Retry-After: so no request, nor any number of
them at once, can take the process past its memory limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from app.engine.resources import MIB, charged_bytes, usable_memory
from app.errors import Overloaded, PayloadTooLarge

# What serving a request holds beside what its data becomes (the protocol's objects, its headers, its answer's
# envelope), reserved with the first byte of its body: measured by tests/test_hostile_bodies.py. A request answered
# without reading a body (a probe, a refusal from its headers) takes no more than this and reserves nothing: what
# those take together is bounded by MAX_CONCURRENCY.
REQUEST_BASE_BYTES = 64 * 1024


def default_budget_bytes(arena_bytes: int, workers: int) -> int:
    """Half of what the process may use (its share, with `workers` processes) beyond what it holds now, once its
    model is loaded, and beyond the `arena_bytes` ONNX Runtime's arena may keep after the largest request (1 MiB at
    least): the other half is room for what the budget does not count, as what the heap keeps of freed objects."""
    return max(MIB, (usable_memory().bytes // workers - charged_bytes() - arena_bytes) // 2)


class MemoryBudget:
    """The bytes the requests in flight may hold together, and each one alone. Thread-safe: reservations come from
    the event loop and from the threads that decode images."""

    def __init__(
        self,
        total_bytes: int,
        per_request_bytes: int,
        report_held: Callable[[int], None] | None = None,
        base_bytes: int = 0,
    ) -> None:
        self.total_bytes = total_bytes
        self.per_request_bytes = min(per_request_bytes, total_bytes)  # more could never be held
        self.base_bytes = base_bytes  # held by a lease from its first reservation on (the server: REQUEST_BASE_BYTES)
        self.held_bytes = 0
        self.peak_held_bytes = 0  # the most held at once since start (or since a test reset it)
        self.report_held = report_held  # told the bytes held whenever they change (a gauge's set)
        self._lock = threading.Lock()

    def lease(self) -> Lease:
        return Lease(self)

    def take(self, nbytes: int) -> bool:
        with self._lock:
            if self.held_bytes + nbytes > self.total_bytes:
                return False
            self._hold(nbytes)
            return True

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self._hold(-nbytes)

    def _hold(self, nbytes: int) -> None:
        self.held_bytes += nbytes
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        if self.report_held is not None:
            self.report_held(self.held_bytes)


class Lease:
    """One request's share of the budget: what it reserved so far, given back at once when it ends."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.bytes = 0

    def reserve(self, nbytes: int, what: str, *, advice: str = "") -> None:
        """Holds `nbytes` more for `what` ("the JSON body, parsed", ...); PayloadTooLarge if this request would then
        hold more than MAX_REQUEST_BYTES, Overloaded if the requests in flight would hold more than the budget."""
        budget = self._budget
        nbytes = max(0, int(nbytes)) + (0 if self.bytes else budget.base_bytes)
        if self.bytes + nbytes > budget.per_request_bytes:
            raise PayloadTooLarge(
                f"{what} would take this request to {(self.bytes + nbytes) / MIB:,.1f} MiB of memory, more than the "
                f"{budget.per_request_bytes / MIB:,.0f} MiB one request may hold (MAX_REQUEST_BYTES, within "
                f"MEMORY_BUDGET_BYTES){advice}"
            )
        if not budget.take(nbytes):
            held, total = budget.held_bytes / MIB, budget.total_bytes / MIB
            raise Overloaded(
                f"the requests in flight hold {held:,.0f} MiB of the {total:,.0f} MiB of MEMORY_BUDGET_BYTES: no room "
                f"for {what} ({nbytes / MIB:,.1f} MiB); retry later"
            )
        self.bytes += nbytes

    def release(self) -> None:
        self._budget.give_back(self.bytes)
        self.bytes = 0
