"""The sweep's markdown: a table of every model and configuration, the ratios, and the targets."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from bench.engines import ALONE_PREFIX, CONFIGS
from bench.markdown import table
from bench.stats import ratio
from bench.sweep import SweepRow
from bench.targets import Check, checks_table


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


def checks(rows: Sequence[SweepRow], model: str) -> list[Check]:
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


def report(rows: Sequence[SweepRow], header: str, target: str) -> str:
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
        [header, table(headers, body), legend, f"Targets (on `{target}`, batch 1):", checks_table(checks(rows, target))]
    )
