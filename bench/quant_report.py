"""The quant command's markdown and its target (at most one point of mean label accuracy lost)."""

from __future__ import annotations

from bench.markdown import table
from bench.quant import LATENCY_CONFIGS, Variant
from bench.stats import ratio
from bench.targets import Check, checks_table
from model_build.config import MAX_ACCURACY_LOSS


def checks(variants: list[Variant]) -> list[Check]:
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


def markdown(variants: list[Variant], header: str) -> str:
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
    return "\n\n".join([header, table(headers, rows), "Targets:", checks_table(checks(variants))])
