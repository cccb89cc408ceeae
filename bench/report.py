"""Every experiment's report: markdown tables and their targets, the sweep's chart, and the sections of
docs/benchmarks.md that each command rewrites in place."""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
from bench.sweep import PUBLISHED_FUSED_MS, PUBLISHED_SEPARATE_MS, ScaleRow, SweepRow
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


# The sweep: a table of every model and configuration, the ratios with their intervals over the interleaved
# rounds, the targets, and the chart.

PUBLISHED_RATIO = PUBLISHED_SEPARATE_MS / PUBLISHED_FUSED_MS  # separate ÷ fused, published: 2.14x
SEPARATE_OVER_FUSED_TARGET = 1.5
FUSED_OVER_SUM_TARGET = 1.10


def _by_model(rows: Sequence[SweepRow]) -> dict[str, dict[str, SweepRow]]:
    grouped: dict[str, dict[str, SweepRow]] = defaultdict(dict)
    for row in rows:
        grouped[row.model][row.config] = row
    return grouped


def _sum_alone(configs: dict[str, SweepRow]) -> list[float] | None:
    """Per round: the sum of the members' medians alone."""
    alone = [r.rounds_ms for name, r in configs.items() if name.startswith(ALONE_PREFIX)]
    return [sum(per_round) for per_round in zip(*alone, strict=True)] if alone else None


def _per_round(configs: dict[str, SweepRow], name: str) -> list[float] | None:
    return list(configs[name].rounds_ms) if name in configs else None


def _interval(numerators: list[float] | None, denominators: list[float] | None) -> Interval | None:
    if not numerators or not denominators:
        return None
    return Interval.of_ratios(numerators, denominators)


def _ratios(configs: dict[str, SweepRow]) -> dict[str, Interval | None]:
    """The sweep's ratios, by column heading, each the mean of per-round ratios with its 95 % interval."""
    fused, fused_nospin = _per_round(configs, "fused-default"), _per_round(configs, "fused-nospin")
    return {
        "separate-default ÷ fused-default": _interval(_per_round(configs, "separate-default"), fused),
        "separate-nospin ÷ fused-nospin": _interval(_per_round(configs, "separate-nospin"), fused_nospin),
        "parallel ÷ fused-nospin": _interval(_per_round(configs, "parallel"), fused_nospin),
        "fused-default ÷ sum alone": _interval(fused, _sum_alone(configs)),
    }


def sweep_lines(rows: Sequence[SweepRow], model: str) -> list[str]:
    """The issue's offline targets, on `model` (the default models, 2 x width 2), each met only when its whole
    95 % interval is."""
    configs = _by_model(rows).get(model, {})
    ratios = _ratios(configs)
    targets = (
        (
            f"{model}: fused ÷ sum of its members alone (default options)",
            "fused-default ÷ sum alone",
            None,
            FUSED_OVER_SUM_TARGET,
        ),
        (
            f"{model}: separate sessions in a loop, default options ÷ fused",
            "separate-default ÷ fused-default",
            SEPARATE_OVER_FUSED_TARGET,
            None,
        ),
    )
    lines = []
    for name, column, low, high in targets:
        interval = ratios[column]
        if interval is None:
            lines.append(f"not measured {name}")
        else:
            lines.append(interval_check(name, interval, at_least=low, at_most=high))
    return lines


def sweep_markdown(rows: Sequence[SweepRow], header: str, target: str) -> str:
    """`header`: how the sweep's models were built and timed."""
    grouped = _by_model(rows)
    names = [c for c in CONFIGS if any(c in configs for configs in grouped.values())]
    body = []
    for model, configs in grouped.items():
        first = next(iter(configs.values()))
        cells: list[object] = [model, f"{first.parameters / 1e6:.2f}", f"{first.mean_label_accuracy:.3f}"]
        cells += [f"{configs[n].median_ms:.2f} ({configs[n].p95_ms:.2f})" if n in configs else "" for n in names]
        alone = _sum_alone(configs)
        cells.append(statistics.median(alone) if alone else None)
        cells += [interval.brief() if interval else None for interval in _ratios(configs).values()]
        body.append(cells)
    headers = [
        "model",
        "params (M)",
        "mean label acc.",
        *(f"{n} p50 (p95) ms" for n in names),
        "sum of members alone, ms",
        *(f"{column} [95 % CI]" for column in _ratios({})),
    ]
    legend = "\n".join(f"- `{name}`: {CONFIGS[name].summary} ({CONFIGS[name].session.describe()})" for name in names)
    return "\n\n".join(
        [
            header,
            table(headers, body),
            legend,
            f"Targets (on `{target}`, batch 1; met only when the whole 95 % interval is):",
            "\n".join(f"- {line}" for line in sweep_lines(rows, target)),
        ]
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    return plt


def _log_axis(axis: Any) -> None:
    """A log axis labelled in plain numbers."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_minor_formatter(ScalarFormatter())


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both counts (lower latency x, higher accuracy y), by latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


SEPARATE, FUSED = "separate-default", "fused-default"  # the published figure's two ways, default options


def plot_sweep(rows: Sequence[SweepRow], path: Path, subtitle: str) -> Path:
    """The published kind of chart: one point per model, median latency (x, log) against mean label accuracy (y),
    coloured by total parameters; each ensemble's separate-sessions point joined to its fused point by an arrow;
    the Pareto front as a step line."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    grouped = _by_model(rows)
    millions = [r.parameters / 1e6 for r in rows]
    norm = plt.Normalize(min(millions), max(millions))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110, layout="constrained")
    points: list[tuple[float, float]] = []
    for model, configs in grouped.items():
        fused = configs.get(FUSED)
        if fused is None:
            continue
        colour = cmap(norm(fused.parameters / 1e6))
        at = (fused.median_ms, fused.mean_label_accuracy)
        points.append(at)
        separate = configs.get(SEPARATE) if fused.kind == "ensemble" else None
        if separate is not None:
            start = (separate.median_ms, separate.mean_label_accuracy)
            points.append(start)
            ax.scatter(*start, s=60, marker="D", facecolors="white", edgecolors=[colour], linewidths=1.6, zorder=3)
            arrow = {"arrowstyle": "-|>", "color": colour, "lw": 1.4, "shrinkA": 5, "shrinkB": 7, "mutation_scale": 14}
            ax.annotate("", at, start, arrowprops=arrow, zorder=6)
        marker = "s" if fused.kind == "ensemble" else "o"
        ax.scatter(*at, s=70, marker=marker, color=colour, edgecolors="black", linewidths=0.5, zorder=4)
        ax.annotate(model, at, textcoords="offset points", xytext=(6, 5), fontsize=8)
    front = pareto_front(points)
    xs, ys = zip(*front, strict=True)
    ax.step(xs, ys, where="post", color="tab:red", linewidth=1.2, alpha=0.8, zorder=1)
    ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="tab:red", linewidths=1.2, zorder=5)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="total parameters (M)")
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("median latency, batch 1, default session options (ms, log scale)")
    ax.set_ylabel("mean label accuracy (held out)")
    ax.set_title(f"Latency vs accuracy: single UNets and ensembles\n{subtitle}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", color="grey", linestyle="", label="single model"),
        Line2D([], [], marker="s", color="grey", linestyle="", label="ensemble, fused graph"),
        Line2D(
            [], [], marker="D", markerfacecolor="white", color="grey", linestyle="", label="ensemble, separate sessions"
        ),
        Line2D([], [], color="grey", marker=r"$\rightarrow$", linestyle="", markersize=12, label="separate → fused"),
        Line2D([], [], color="tab:red", label="Pareto front (faster and more accurate)"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# Scale: separate ÷ fused against input size, per layout.


def scale_lines(rows: Sequence[ScaleRow], published_size: int) -> list[str]:
    """At the published scale, with the published layout: separate ÷ fused against the issue's >= 1.5x."""
    return [
        interval_check(
            f"{r.size}px, {r.layout}: separate sessions in a loop ÷ fused",
            r.ratio,
            at_least=SEPARATE_OVER_FUSED_TARGET,
        )
        for r in rows
        if r.size == published_size
    ]


def scale_markdown(rows: Sequence[ScaleRow], header: str, published_size: int) -> str:
    body = [
        [
            f"**{r.size}**" if r.size == published_size else r.size,
            r.layout,
            r.separate_ms,
            r.fused_ms,
            r.ratio.brief(),
            r.saved_ms.brief(),
            r.load_average_1m,
        ]
        for r in rows
    ]
    headers = [
        "size (px)",
        "layout (both sides)",
        "separate p50 ms",
        "fused p50 ms",
        "separate ÷ fused [95 % CI]",
        "separate - fused, ms [95 % CI]",
        "load (1 min)",
    ]
    return "\n\n".join(
        [
            header,
            table(headers, body),
            f"Targets (at {published_size}px, met only when the whole 95 % interval is):",
            "\n".join(f"- {line}" for line in scale_lines(rows, published_size)),
        ]
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def plot_scale(rows: Sequence[ScaleRow], published_size: int, path: Path, subtitle: str) -> Path:
    """Left: separate ÷ fused against input size, a line per layout with 95 % error bars, 1.0 and the published
    2.14x marked. Right: both sides' latencies (log-log)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=100, layout="constrained")
    layouts = list(dict.fromkeys(r.layout for r in rows))
    sizes = sorted({r.size for r in rows})
    for i, layout in enumerate(layouts):
        mine = sorted((r for r in rows if r.layout == layout), key=lambda r: r.size)
        colour = f"C{i}"
        xs = [r.size for r in mine]
        ratios = [r.ratio for r in mine]
        errors = [[_finite(ci.mean - ci.low) for ci in ratios], [_finite(ci.high - ci.mean) for ci in ratios]]
        left.errorbar(xs, [ci.mean for ci in ratios], yerr=errors, marker="o", capsize=4, color=colour, label=layout)
        right.plot(
            xs, [r.separate_ms for r in mine], marker="D", linestyle="--", color=colour, label=f"separate, {layout}"
        )
        right.plot(xs, [r.fused_ms for r in mine], marker="s", color=colour, label=f"fused, {layout}")
    left.axhline(1.0, color="grey", linewidth=1)
    left.axhline(PUBLISHED_RATIO, color="tab:red", linestyle=":", label=f"published: {PUBLISHED_RATIO:.2f}x")
    for ax in (left, right):
        ax.axvline(published_size, color="black", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel(
            f"input size (px, square; dotted: {published_size}px, the published loop's ~{PUBLISHED_SEPARATE_MS:.0f} ms)"
        )
        ax.grid(True, alpha=0.3)
    left.set_ylabel("separate sessions in a loop ÷ fused (mean of rounds, 95 % CI)")
    left.legend(fontsize=8)
    right.set_yscale("log")
    _log_axis(right.yaxis)
    right.set_ylabel("median latency, ms (log)")
    right.legend(fontsize=7)
    fig.suptitle(f"Two width-2 UNets: separate vs fused across input sizes\n{subtitle}", fontsize=9)
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
