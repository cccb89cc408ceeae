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


def requested_outputs(manifest: Manifest) -> list[str] | None:
    """What the load tests ask every server for: an image model's scores (its mask would make the answer a JSON
    list of every pixel's scores), else every output (None)."""
    image = manifest.image
    return [image.scores_output] if image is not None and image.scores_output is not None else None


def v2_body(manifest: Manifest, mode: Mode, path: Path, outputs: Sequence[str] | None = None) -> Path:
    """Writes the v2 JSON request of the model's example input, in `mode`, asking for `outputs` (None: all)."""
    path.write_text(json.dumps(v2_json_body(manifest.example_inputs(), outputs, mode=mode.value)))
    return path


def hey(
    url: str,
    body: Path,
    *,
    clients: int,
    seconds: float | None = None,
    requests: int | None = None,
    content_type: str = "application/json",
) -> Run:
    """POSTs `body` to `url` from `clients` closed-loop workers, for `seconds` or `requests` in all."""
    if shutil.which("hey") is None:
        raise SystemExit("this command needs Debian's `hey` (apt-get install hey)")
    amount = ["-z", f"{seconds}s"] if seconds is not None else ["-n", str(requests)]
    command = ["hey", *amount, "-c", str(clients), "-m", "POST", "-T", content_type, "-D", str(body)]
    timeout = 60 + (seconds or 0) * 2 + (requests or 0)
    output = subprocess.run([*command, "-o", "csv", url], capture_output=True, text=True, timeout=timeout, check=True)
    replies = [row for row in csv.DictReader(io.StringIO(output.stdout)) if row.get("status-code", "").isdigit()]
    statuses = [int(row["status-code"]) for row in replies]
    elapsed = seconds or max((float(row["offset"]) + float(row["response-time"]) for row in replies), default=1.0)
    return Run(
        accepted=[float(row["response-time"]) for row, status in zip(replies, statuses, strict=True) if status == 200],
        refused=statuses.count(503),
        failed=sum(status not in (200, 503) for status in statuses),
        seconds=elapsed,
    )


def load_rounds(
    targets: Sequence[Target], clients: Sequence[int], seconds: float, rounds: int
) -> dict[tuple[Target, int], list[Run]]:
    """A warm-up, then `rounds` interleaved rounds of `seconds` of load on each target from each number of
    `clients`; the runs of each (target, clients), one per round."""
    for target in targets:
        hey(target.url, target.body, clients=1, requests=WARMUP_REQUESTS, content_type=target.content_type)
    per_round = interleave(
        list(targets),
        rounds,
        lambda t: {c: hey(t.url, t.body, clients=c, seconds=seconds, content_type=t.content_type) for c in clients},
    )
    return {(t, c): [runs[c] for runs in per_round[t]] for t in targets for c in clients}


def load_table(runs: dict[tuple[Target, int], list[Run]], targets: Sequence[Target], clients: Sequence[int]) -> str:
    """Per target and clients: goodput (200s a second), the accepted requests' p50 and p99 (means over rounds with
    their 95 % intervals), and ratios to the first target's, round by round."""
    first = targets[0]
    rows = []
    for target in targets:
        for c in clients:
            mine, theirs = runs[target, c], runs[first, c]
            p50s = [r.percentile_ms(50) for r in mine]
            rows.append(
                [
                    target.name,
                    c,
                    Interval.of([r.goodput for r in mine]).brief(),
                    Interval.of_ratios([r.goodput for r in mine], [r.goodput for r in theirs]).brief(),
                    Interval.of(p50s).brief(),
                    Interval.of_ratios(p50s, [r.percentile_ms(50) for r in theirs]).brief(),
                    Interval.of([r.percentile_ms(99) for r in mine]).brief(),
                    sum(r.refused for r in mine),
                    sum(r.failed for r in mine),
                ]
            )
    headers = ["server", "clients", "goodput /s [95 % CI]", f"goodput ÷ {first.name}", "p50 ms [95 % CI]"]
    headers += [f"p50 ÷ {first.name}", "accepted p99 ms [95 % CI]", "refused (503)", "failed"]
    return table(headers, rows)
