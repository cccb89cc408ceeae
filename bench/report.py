"""Every experiment's report: markdown tables and their targets, the sweep's chart, and the sections of
docs/benchmarks.md that each command rewrites in place."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.core import ALONE_PREFIX, CONFIGS, Budget, Check, Interval, Summary, interval_check, moved, ratio
from bench.http_load import LoadResult
from bench.interference import SERVICE_DEFAULT_SPINNING, InterferenceRow
from bench.load import (
    BODY_TIMEOUT_S,
    OVERLOAD_CLIENTS,
    OVERLOAD_FACTOR,
    OVERLOAD_QUEUE,
    OVERLOAD_SLOTS,
    LoadReport,
    OverloadRound,
)
from bench.quant import LATENCY_CONFIGS, Variant
from bench.sweep import SweepRow
from model_build.config import MAX_ACCURACY_LOSS

NAN = float("nan")

# Markdown.


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_section(path: Path, name: str, body: str) -> None:
    """Replaces the text between this section's markers (appends the section if it has none)."""
    start, end = _markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def checks_table(checks: Sequence[Check]) -> str:
    return table(["target", "measured", "limit", "verdict"], [c.row() for c in checks])


# The sweep: a table of every model and configuration, the ratios, the targets, and the chart.


def _by_model(rows: Sequence[SweepRow]) -> dict[str, dict[str, SweepRow]]:
    grouped: dict[str, dict[str, SweepRow]] = defaultdict(dict)
    for row in rows:
        grouped[row.model][row.config] = row
    return grouped


def _sum_alone(configs: dict[str, SweepRow]) -> float:
    alone = [r.median_ms for name, r in configs.items() if name.startswith(ALONE_PREFIX)]
    return sum(alone) if alone else float("nan")


def _median(configs: dict[str, SweepRow], name: str) -> float:
    return configs[name].median_ms if name in configs else float("nan")


def sweep_checks(rows: Sequence[SweepRow], model: str) -> list[Check]:
    """The issue's offline targets, on `model` (the default models, 2 x width 2)."""
    configs = _by_model(rows).get(model, {})
    fused = _median(configs, "fused-default")
    return [
        Check(f"{model}: fused ÷ sum of its members alone (default options)", ratio(fused, _sum_alone(configs)), 1.10),
        Check(
            f"{model}: separate sessions in a loop, default options ÷ fused",
            ratio(_median(configs, "separate-default"), fused),
            1.5,
            at_most=False,
        ),
    ]


def sweep_markdown(rows: Sequence[SweepRow], header: str, target: str) -> str:
    """`header`: how the sweep's models were built and timed."""
    grouped = _by_model(rows)
    names = [c for c in CONFIGS if any(c in configs for configs in grouped.values())]
    body = []
    for model, configs in grouped.items():
        first = next(iter(configs.values()))
        cells: list[object] = [model, f"{first.parameters / 1e6:.2f}", f"{first.mean_label_accuracy:.3f}"]
        cells += [f"{configs[n].median_ms:.2f} ({configs[n].p95_ms:.2f})" if n in configs else "" for n in names]
        fused = _median(configs, "fused-default")
        cells += [
            _sum_alone(configs),
            ratio(_median(configs, "separate-default"), fused),
            ratio(_median(configs, "separate-nospin"), _median(configs, "fused-nospin")),
            ratio(_median(configs, "parallel"), _median(configs, "fused-nospin")),
            ratio(fused, _sum_alone(configs)),
        ]
        body.append(cells)
    headers = [
        "model",
        "params (M)",
        "mean label acc.",
        *(f"{n} p50 (p95) ms" for n in names),
        "sum of members alone, ms",
        "separate-default ÷ fused-default",
        "separate-nospin ÷ fused-nospin",
        "parallel ÷ fused-nospin",
        "fused-default ÷ sum alone",
    ]
    legend = "\n".join(f"- `{name}`: {CONFIGS[name].summary} ({CONFIGS[name].session.describe()})" for name in names)
    return "\n\n".join(
        [
            header,
            table(headers, body),
            legend,
            f"Targets (on `{target}`, batch 1):",
            checks_table(sweep_checks(rows, target)),
        ]
    )


STYLES: dict[str, dict[str, object]] = {
    "separate-default": {"marker": "s", "color": "tab:red", "linestyle": "-"},
    "separate-nospin": {"marker": "D", "color": "tab:orange", "linestyle": "--"},
    "separate-globalpool": {"marker": "P", "color": "tab:brown", "linestyle": ":"},
    "parallel": {"marker": "^", "color": "tab:purple", "linestyle": "-."},
    "fused-default": {"marker": "o", "color": "tab:blue", "linestyle": "-"},
    "fused-nospin": {"marker": "*", "color": "tab:green", "linestyle": "--"},
}
LABEL_AT = "fused-default"  # each model's label sits next to this mode's marker


def plot_sweep(rows: Sequence[SweepRow], path: Path, subtitle: str) -> Path:
    """Median latency (x) against mean label accuracy (y), like the published chart: a line per mode through a
    marker per model, each model labelled once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(10, 7), dpi=120, layout="constrained")
    for config, style in STYLES.items():
        points = sorted((r.median_ms, r.mean_label_accuracy) for r in rows if r.config == config)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, markersize=6, linewidth=1.2, alpha=0.85, label=CONFIGS[config].summary, **style)  # type: ignore[arg-type]
    for row in rows:
        if row.config == LABEL_AT:
            ax.annotate(
                row.model,
                (row.median_ms, row.mean_label_accuracy),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("median latency, batch 1 (ms, log scale)")
    ax.set_ylabel("mean label accuracy (held out)")
    ax.set_title(f"Latency vs accuracy: single UNets (w2..w7) and ensembles\n{subtitle}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# Load.


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


def load_checks(report: LoadReport) -> list[Check]:
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
                moved(alone, _compare_split(report, mode)),
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


def _summary_ms(summary: Summary | None, field: str) -> float:
    return getattr(summary, field) if summary is not None else NAN


# The overload rounds' figures and their targets (what tests/test_overload.py and tests/test_reliability_bodies.py
# bounded once): the accepted requests keep a bounded p99 (one waits behind at most the queue and the slot, times
# 3 for the refusals' share of the core), the rest are turned away at once, goodput does not collapse, and a
# stalled upload gets its 408 soon after BODY_TIMEOUT_S. (name, figure of a round, at least, at most)
OVERLOAD_TARGETS: tuple[tuple[str, Callable[[OverloadRound], float], float | None, float | None], ...] = (
    ("refusals' p50, ms", lambda r: _summary_ms(r.overload.refused, "median_ms"), None, 50.0),
    (
        "refusals' p95 / accepted p50",
        lambda r: ratio(_summary_ms(r.overload.refused, "p95_ms"), _summary_ms(r.overload.latency, "median_ms")),
        None,
        1.0,
    ),
    (
        "accepted p99 / p99 of one client alone",
        lambda r: ratio(_summary_ms(r.overload.latency, "p99_ms"), _summary_ms(r.alone.latency, "p99_ms")),
        None,
        3 * (OVERLOAD_QUEUE + OVERLOAD_SLOTS + 1),
    ),
    (
        f"goodput / throughput at {OVERLOAD_CLIENTS} clients",
        lambda r: ratio(r.overload.throughput_rps, r.saturated.throughput_rps),
        0.5,
        None,
    ),
    ("stalled upload's 408 after / BODY_TIMEOUT_S", lambda r: r.stalled_upload_s / BODY_TIMEOUT_S, 1.0, 2.5),
)


def overload_lines(report: LoadReport) -> list[str]:
    return [
        interval_check(name, Interval.of([figure(r) for r in report.overload]), at_least=low, at_most=high)
        for name, figure, low, high in OVERLOAD_TARGETS
    ]


def _overload_markdown(report: LoadReport) -> str:
    where = "on one core, the load generator on the others" if report.overload_pinned else "sharing one core"
    rounds = table(
        ["round", "alone p99 ms", f"{OVERLOAD_CLIENTS} clients, requests/s", "offered/s", "statuses", "stalled upload"],
        [
            [
                i + 1,
                _summary_ms(r.alone.latency, "p99_ms"),
                r.saturated.throughput_rps,
                r.overload.rate_rps,
                " ".join(f"{k}:{v}" for k, v in r.overload.statuses.items()),
                f"{r.stalled_upload_status} after {r.stalled_upload_s:.2f} s",
            ]
            for i, r in enumerate(report.overload)
        ],
    )
    return "\n\n".join(
        [
            f"Overload: a service with {OVERLOAD_SLOTS} inference slot and a queue of {OVERLOAD_QUEUE} ({where}), "
            f"sent {OVERLOAD_FACTOR}x the throughput {OVERLOAD_CLIENTS} closed-loop clients get, as an open loop of "
            f"large PNGs; and an upload that stalls after its headers (BODY_TIMEOUT_S={BODY_TIMEOUT_S:g}). "
            f"{len(report.overload)} rounds; a target is met only when its whole 95 % interval is:",
            rounds,
            "\n".join(f"- {line}" for line in overload_lines(report)),
        ]
    )


def load_markdown(report: LoadReport) -> str:
    header = (
        f"Model {report.model_dir} (ensemble sha256 {report.model_sha256[:12]}), service at {report.service_url}. "
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
            checks_table(load_checks(report)),
            _overload_markdown(report),
        ]
    )


# Interference.


def interference_checks(rows: list[InterferenceRow]) -> list[Check]:
    return [
        Check(f"{r.mode}: p50 moved by interleaving (service settings, in-process)", r.moved, 1.10)
        for r in rows
        if r.allow_spinning == SERVICE_DEFAULT_SPINNING
    ]


def interference_markdown(rows: list[InterferenceRow], model_dir: Path, budget: Budget) -> str:
    modes = ", ".join(dict.fromkeys(row.mode for row in rows))
    header = (
        f"Model {model_dir}; the service's runtime in-process (no HTTP), each configuration in its own "
        f"process: {budget.warmup} warm-up rounds, then {budget.runs} timed rounds (at most "
        f"{budget.max_seconds:g} s). Interleaved: {modes} in turn, one inference at a time, "
        "as `compare` traffic runs with one inference slot. Latencies are p50 (p95) in ms."
    )
    body = [
        [
            f"{int(r.allow_spinning)}{' (service default)' if r.allow_spinning == SERVICE_DEFAULT_SPINNING else ''}",
            r.mode,
            f"{r.alone.median_ms:.2f} ({r.alone.p95_ms:.2f})",
            f"{r.interleaved.median_ms:.2f} ({r.interleaved.p95_ms:.2f})",
            ratio(r.interleaved.median_ms, r.alone.median_ms),
        ]
        for r in rows
    ]
    headers = ["allow_spinning", "mode", "alone p50 (p95) ms", "interleaved p50 (p95) ms", "interleaved ÷ alone"]
    return "\n\n".join([header, table(headers, body), "Targets:", checks_table(interference_checks(rows))])


# Quantisation: at most one point of mean label accuracy lost.


def quant_checks(variants: list[Variant]) -> list[Check]:
    fp32 = variants[0].metrics
    return [
        Check(
            f"{v.name}: mean label accuracy lost (points)",
            (fp32.mean_label_accuracy - v.metrics.mean_label_accuracy) * 100,
            MAX_ACCURACY_LOSS * 100,
            unit=" pt",
        )
        for v in variants[1:]
    ]


def quant_markdown(variants: list[Variant], model_dir: Path, budget: Budget, calibration_images: int) -> str:
    header = (
        f"The fused graph of {model_dir}; accuracy on {variants[0].metrics.images} held-out images. Static: "
        f"QDQ, per-channel int8 weights, uint8 activations, calibrated on {calibration_images} training-seed "
        f"images; dynamic: uint8 weights. Each latency in its own process, {budget.runs} timed runs, batch 1, "
        "p50 (p95) in ms."
    )
    fp32 = variants[0]
    rows = [
        [
            v.name,
            f"{v.size_bytes / 2**20:.1f}",
            f"{v.metrics.mean_label_accuracy:.4f}",
            f"{(v.metrics.mean_label_accuracy - fp32.metrics.mean_label_accuracy) * 100:+.2f}",
            f"{v.metrics.mean_iou:.3f}",
            *(f"{v.latency[c].median_ms:.2f} ({v.latency[c].p95_ms:.2f})" for c in LATENCY_CONFIGS),
            *(ratio(v.latency[c].median_ms, fp32.latency[c].median_ms) for c in LATENCY_CONFIGS),
        ]
        for v in variants
    ]
    headers = [
        "variant",
        "MiB",
        "mean label acc.",
        "Δ points",
        "mean IoU",
        *(f"{c} p50 (p95) ms" for c in LATENCY_CONFIGS),
        *(f"{c} ÷ fp32" for c in LATENCY_CONFIGS),
    ]
    return "\n\n".join([header, table(headers, rows), "Targets:", checks_table(quant_checks(variants))])
