"""Decoding and inference run below the event loop's CPU priority, so that a saturated server still reads
requests and refuses the excess at once (tests/test_overload.py measures the effect)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from app.engine.priority import WORKER_NICENESS
from bench.service import png_bytes


def niceness(native_id: int) -> int:
    """The nice value of one of this process's threads (field 19 of /proc/self/task/TID/stat)."""
    stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_worker_threads_run_below_the_event_loop(client: httpx.Client) -> None:
    response = client.post(
        "/predict", params={"mode": "parallel"}, content=png_bytes(), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200
    workers = {
        thread.name: niceness(thread.native_id)
        for thread in threading.enumerate()
        if thread.native_id and thread.name.split("_")[0] in ("convert", "inference", "member")
    }
    assert {name.split("_")[0] for name in workers} == {"convert", "inference", "member"}
    assert set(workers.values()) == {WORKER_NICENESS}
    assert niceness(threading.get_native_id()) < WORKER_NICENESS  # the test's own thread, like the event loop
