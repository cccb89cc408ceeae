"""Debian's `hey`, a compiled HTTP load generator, as the benchmarks' client (so the client's Python does not
weigh on the server), and the v2 request body it sends."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ensemble_contract.datatypes import of_numpy
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode


@dataclass(frozen=True)
class Reply:
    status: int
    seconds: float  # hey's response time
    offset_s: float  # when it was sent, from the start of the run


def available() -> bool:
    return shutil.which("hey") is not None


def v2_body(manifest: Manifest, mode: Mode) -> bytes:
    """A v2 JSON inference request of one example input, in `mode`."""
    inputs = [
        {"name": k, "shape": list(v.shape), "datatype": of_numpy(v.dtype), "data": v.ravel().tolist()}
        for k, v in manifest.example_inputs().items()
    ]
    return json.dumps({"inputs": inputs, "parameters": {"mode": mode.value}}).encode()


def run(
    url: str, body: Path, *, concurrency: int, requests: int | None = None, seconds: float | None = None
) -> list[Reply]:
    """POSTs `body` (JSON) to `url`: `requests` in all, or for `seconds`, from `concurrency` workers each sending
    its next request as soon as the last is answered (a closed loop). Every reply, refusals included."""
    amount = ["-n", str(requests)] if requests is not None else ["-z", f"{seconds}s"]
    command = ["hey", *amount, "-c", str(concurrency), "-m", "POST", "-T", "application/json", "-D", str(body)]
    timeout = 60 + (seconds or 0) * 2 + (requests or 0) * 0.5
    output = subprocess.run(
        [*command, "-o", "csv", url], capture_output=True, text=True, timeout=timeout, check=True
    ).stdout
    return [
        Reply(int(row["status-code"]), float(row["response-time"]), float(row["offset"]))
        for row in csv.DictReader(io.StringIO(output))
        if row.get("status-code", "").isdigit()
    ]
