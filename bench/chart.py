"""The sweep's chart, like the published one: median latency (x) against mean label accuracy (y), a line per
mode through a marker per model, each model labelled once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib.ticker import LogLocator, ScalarFormatter

from bench.engines import CONFIGS
from bench.sweep import SweepRow

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
