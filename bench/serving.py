"""The HTTP side of the serving experiments: the v2 JSON request of a model's example input, Debian's `hey` sending
it (compiled: no client's Python weighs on the servers), and servers under the same load in interleaved rounds."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.engine.timing import percentiles_ms
from bench.common import NAN, Interval, interleave, table
from bench.service import v2_json_body
from ensemble_contract.manifest import Manifest
from ensemble_contract.modes import Mode

WARMUP_REQUESTS = 10


@dataclass(frozen=True)
class Target:
    """One server (and mode) under load: where requests go, and the body each sends."""

    name: str
    url: str
    body: Path
    content_type: str = "application/json"


@dataclass(frozen=True)
class Run:
    """One `hey` run: the answered requests' latencies in seconds, the refused (503) and otherwise failed ones."""

    accepted: list[float]
    refused: int
    failed: int
    seconds: float

    @property
    def goodput(self) -> float:
        return len(self.accepted) / self.seconds

    def percentile_ms(self, percent: float) -> float:
        return percentiles_ms(self.accepted, [percent])[0] if self.accepted else NAN


def figures(runs: Sequence[Run]) -> tuple[list[float], list[float], list[float]]:
    """The runs' goodputs, accepted p50s and p99s (ms), in round order."""
    return [r.goodput for r in runs], [r.percentile_ms(50) for r in runs], [r.percentile_ms(99) for r in runs]


def requested_outputs(manifest: Manifest) -> list[str] | None:
    """What the load tests ask every server for: an image model's scores (its mask would make the answer a JSON
    list of every pixel's scores), else every output (None)."""
    image = manifest.image
    return [image.scores_output] if image is not None and image.scores_output is not None else None


def v2_body(manifest: Manifest, mode: Mode, path: Path, outputs: Sequence[str] | None = None) -> Path:
    """Writes the v2 JSON request of the model's example input, in `mode`, asking for `outputs` (None: all)."""
    path.write_text(json.dumps(v2_json_body(manifest.example_inputs(), outputs, mode=mode.value)))
    return path


def hey(target: Target, clients: int, seconds: float | None = None, requests: int = WARMUP_REQUESTS) -> Run:
    """POSTs the target's body from `clients` closed-loop workers, for `seconds` (None: `requests` in all)."""
    if shutil.which("hey") is None:
        raise SystemExit("this command needs Debian's `hey` (apt-get install hey)")
    amount = ["-z", f"{seconds}s"] if seconds is not None else ["-n", str(requests)]
    command = ["hey", *amount, "-c", str(clients), "-m", "POST", "-T", target.content_type, "-D", str(target.body)]
    timeout = 60 + (seconds or 0) * 2 + requests
    output = subprocess.run([*command, "-o", "csv", target.url], capture_output=True, text=True, timeout=timeout,
                            check=True)  # fmt: skip
    replies = [row for row in csv.DictReader(io.StringIO(output.stdout)) if row.get("status-code", "").isdigit()]
    statuses = [int(row["status-code"]) for row in replies]
    elapsed = seconds or max((float(row["offset"]) + float(row["response-time"]) for row in replies), default=1.0)
    accepted = [float(row["response-time"]) for row, status in zip(replies, statuses, strict=True) if status == 200]
    return Run(accepted, statuses.count(503), sum(status not in (200, 503) for status in statuses), elapsed)


def load_rounds(
    targets: Sequence[Target], clients: Sequence[int], seconds: float, rounds: int
) -> dict[tuple[Target, int], list[Run]]:
    """A warm-up, then `rounds` interleaved rounds of `seconds` of load on each target from each number of
    `clients`; the runs of each (target, clients), one per round."""
    for target in targets:
        hey(target, clients=1)
    per_round = interleave(list(targets), rounds, lambda t: {c: hey(t, c, seconds) for c in clients})
    return {(t, c): [runs[c] for runs in per_round[t]] for t in targets for c in clients}


def load_table(runs: dict[tuple[Target, int], list[Run]], targets: Sequence[Target], clients: Sequence[int]) -> str:
    """Per target and clients: goodput (200s a second), the accepted requests' p50 and p99 (means over rounds with
    their 95 % intervals), and ratios to the first target's, round by round."""
    first, rows = targets[0], []
    for target, c in ((target, c) for target in targets for c in clients):
        (goodput, p50, p99), theirs = figures(runs[target, c]), figures(runs[first, c])
        cells = [Interval.of(goodput), Interval.of_ratios(goodput, theirs[0]), Interval.of(p50)]
        cells += [Interval.of_ratios(p50, theirs[1]), Interval.of(p99)]
        failed = [sum(r.refused for r in runs[target, c]), sum(r.failed for r in runs[target, c])]
        rows.append([target.name, c, *(cell.brief() for cell in cells), *failed])
    headers = ["server", "clients", "goodput /s [95 % CI]", f"goodput ÷ {first.name}", "p50 ms [95 % CI]"]
    headers += [f"p50 ÷ {first.name}", "accepted p99 ms [95 % CI]", "refused (503)", "failed"]
    return table(headers, rows)
