"""CPU time of threads, to charge each prediction what it cost: the calling thread's own clock, and the
kernel's per-thread counters for threads Python did not start (ONNX Runtime's intra-op pools).

Linux only (/proc/self/task/<tid>/schedstat: nanoseconds on a CPU); elsewhere the pools are not counted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
TASKS = Path("/proc/self/task")


def thread_ids() -> frozenset[int]:
    """The kernel ids of this process's threads now."""
    try:
        return frozenset(int(name) for name in os.listdir(TASKS))
    except OSError:
        return frozenset()


def new_threads(create: Callable[[], T]) -> tuple[T, frozenset[int]]:
    """What `create` returns, and the threads that appeared while it ran (the pools of the sessions it opened)."""
    before = thread_ids()
    created = create()
    return created, thread_ids() - before


def threads_cpu_seconds(threads: Collection[int]) -> float:
    """CPU seconds the given threads have run, in all (threads that have exited count for nothing)."""
    total = 0
    for tid in threads:
        try:
            total += int((TASKS / str(tid) / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def timed_cpu(work: Callable[[], T]) -> tuple[T, float]:
    """What `work` returns, and the CPU seconds the calling thread spent on it."""
    start = time.thread_time()
    result = work()
    return result, time.thread_time() - start
