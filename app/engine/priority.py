"""CPU priority of the work done off the event loop.

Decoding and inference run in worker threads (and ONNX Runtime's own pools) at a lower priority than the event
loop, so that when the cores are saturated the loop still reads requests promptly and refuses the excess at
once, rather than taking its turn behind decoding and inference. Nothing is lost: the scheduler gives the
workers every cycle the loop does not use.
"""

from __future__ import annotations

import contextlib
import os
import threading

WORKER_NICENESS = 5


def lower_thread_priority() -> None:
    """Runs the calling thread at WORKER_NICENESS (Linux sets nice values per thread; threads it starts
    inherit it). Best effort: a no-op where the platform has no per-thread priorities."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
