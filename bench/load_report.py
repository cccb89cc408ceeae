"""The load command's markdown and its targets."""

from __future__ import annotations

import math

from bench.load import LoadResult
from bench.markdown import table
from bench.online import LoadReport
from bench.stats import ratio
from bench.targets import Check, checks_table

NAN = float("nan")


def _at_c1(report: LoadReport, target: str, mode: str) -> LoadResult | None:
    return next(
        (r for r in report.results if (r.target, r.mode, r.pattern, r.concurrency) == (target, mode, "closed", 1)),
        None,
    )


def _p50(result: LoadResult | None) -> float:
    return result.latency.median_ms if result and result.latency else NAN


def _saturation(report: LoadReport, target: str, mode: str) -> float:
    closed = [r.throughput_rps for r in report.results if (r.target, r.mode, r.pattern) == (target, mode, "closed")]
    return max(closed, default=NAN)


def _compare_split(report: LoadReport, mode: str) -> float:
    compare = _at_c1(report, "service", "compare")
    return compare.by_mode[mode].median_ms if compare and mode in compare.by_mode else NAN


def _moved(alone: float, interleaved: float) -> float:
    r = ratio(interleaved, alone)
    return max(r, 1 / r) if r > 0 and not math.isnan(r) else NAN


def checks(report: LoadReport) -> list[Check]:
    fused = _p50(_at_c1(report, "service", "fused"))
    result = [
        Check(
            "service sequential ÷ fused, p50 at c=1", ratio(_p50(_at_c1(report, "service", "sequential")), fused), 1.15
        ),
        Check("service parallel ÷ fused, p50 at c=1", ratio(_p50(_at_c1(report, "service", "parallel")), fused), 1.0),
    ]
    for mode in report.floor:
        floor = report.floor[mode]
        alone = _p50(_at_c1(report, "service", mode))
        result += [
            Check(f"{mode}: service p50 at c=1 ÷ in-process p50", ratio(alone, floor.median_ms), 1.15),
            Check(
                f"{mode}: service saturation throughput ÷ in-process",
                ratio(_saturation(report, "service", mode), 1000 / floor.mean_ms),
                0.90,
                at_most=False,
            ),
            Check(
                f"{mode}: p50 moved by interleaving (compare vs alone, c=1)",
                _moved(alone, _compare_split(report, mode)),
                1.10,
            ),
        ]
    return result


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _split_at_c1(report: LoadReport) -> str:
    """Where the time of one request at c=1 goes: the client's latency against the service's Server-Timing."""
    rows = []
    for mode in report.floor:
        result = _at_c1(report, "service", mode)
        server = result.server_timing_p50_ms if result else {}
        rows.append(
            [
                mode,
                report.floor[mode].median_ms,
                *(server.get(k, NAN) for k in ("inference", "preprocess", "queue", "total")),
                _p50(result),
                _p50(result) - server.get("total", NAN),
            ]
        )
    headers = [
        "mode",
        "in-process p50",
        "inference",
        "preprocess",
        "queue",
        "server total",
        "client p50",
        "HTTP + client",
    ]
    return (
        "Where a request's time goes at c=1 (p50 in ms; the middle columns from the service's Server-Timing):\n\n"
        + (table(headers, rows))
    )


def markdown(report: LoadReport, header: str) -> str:
    header += (
        f" Model {report.model_dir} (ensemble sha256 {report.model_sha256[:12]}), service at {report.service_url}. "
        "The load generator (httpx, asyncio) runs on the same cores as the servers. Requests: a 128x128 PNG as "
        f"multipart `file`. Open loop: Poisson arrivals at {report.open_rate_rps:.1f} requests/s, latency from the "
        "scheduled arrival."
    )
    floor = table(
        ["mode", "in-process p50 ms", "p95 ms", "capacity (1 / mean), requests/s"],
        [[m, s.median_ms, s.p95_ms, 1000 / s.mean_ms] for m, s in report.floor.items()],
    )
    rows = []
    for r in report.results:
        load = f"closed, c={r.concurrency}" if r.pattern == "closed" else f"open, {r.rate_rps:.1f}/s"
        lat = r.latency
        rows.append(
            [
                r.target,
                r.mode,
                load,
                *(([lat.median_ms, lat.p95_ms, lat.p99_ms]) if lat else ["", "", ""]),
                r.throughput_rps,
                f"{r.error_rate:.1%}",
                " ".join(f"{k}:{v}" for k, v in r.statuses.items()),
            ]
        )
    load = table(["server", "mode", "load", "p50 ms", "p95 ms", "p99 ms", "throughput/s", "errors", "statuses"], rows)
    split = table(
        ["mode", "alone p50 ms (c=1)", "in `compare` p50 ms (c=1)", "ratio"],
        [
            [
                m,
                _p50(_at_c1(report, "service", m)),
                _compare_split(report, m),
                ratio(_compare_split(report, m), _p50(_at_c1(report, "service", m))),
            ]
            for m in report.floor
        ],
    )
    baseline = ratio(_p50(_at_c1(report, "baseline", "default")), _p50(_at_c1(report, "service", "fused")))
    memory = (
        f"Resident memory: service {_mb(report.service_rss_idle_bytes)} idle after start-up, "
        f"{_mb(report.service_rss_after_bytes)} after the load; baseline server {_mb(report.baseline_rss_after_bytes)} "
        f"after the load. Baseline p50 ÷ service fused p50 at c=1: {baseline:.2f}x."
    )
    return "\n\n".join(
        [
            header,
            "In-process floor (the service's runtime, no HTTP):",
            floor,
            "Under load:",
            load,
            _split_at_c1(report),
            "Interleaving through the service:",
            split,
            memory,
            "Targets:",
            checks_table(checks(report)),
        ]
    )
