"""The offline sweep: every model of the zoo, every way to run it, each configuration in its own process."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from bench.engines import CONFIGS, alone
from bench.isolated import measure_isolated
from bench.machine import Machine
from bench.stats import Summary
from bench.timing import Budget
from bench.worker import MeasureSpec
from bench.zoo import ModelSpec
from ensemble_contract.manifest import Manifest, load_manifest

SINGLE_CONFIGS = ("separate-default", "separate-nospin", "fused-default", "fused-nospin")


class SweepRow(BaseModel):
    model: str
    kind: str
    widths: str
    members: int
    parameters: int
    image_size: int
    config: str
    median_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    mean_label_accuracy: float
    exact_match_accuracy: float
    mean_iou: float
    cpu: str
    cores: int
    onnxruntime: str
    load_average_1m: float | None
    measured_at: str

    @property
    def key(self) -> tuple[str, str]:
        return self.model, self.config


def configs_for(spec: ModelSpec) -> list[str]:
    """A single model runs the same alone, separate or in parallel, so it gets fewer configurations."""
    if not spec.is_ensemble:
        return list(SINGLE_CONFIGS)
    return [*CONFIGS, *(alone(i).name for i in range(len(spec.members)))]


def _row(
    spec: ModelSpec, manifest: Manifest, config: str, machine: Machine, summary_of: dict[str, Summary]
) -> SweepRow:
    metrics = manifest.ensemble_metrics or manifest.members[0].metrics
    if metrics is None:
        raise ValueError(f"{spec.label}: the manifest has no held-out metrics")
    summary = summary_of[config]
    return SweepRow(
        model=spec.label,
        kind="ensemble" if spec.is_ensemble else "single",
        widths=spec.widths,
        members=len(spec.members),
        parameters=sum(m.parameters or 0 for m in manifest.members),
        image_size=manifest.image.height if manifest.image else 0,
        config=config,
        median_ms=summary.median_ms,
        p95_ms=summary.p95_ms,
        p99_ms=summary.p99_ms,
        mean_ms=summary.mean_ms,
        runs=summary.count,
        mean_label_accuracy=metrics.mean_label_accuracy,
        exact_match_accuracy=metrics.exact_match_accuracy,
        mean_iou=metrics.mean_iou,
        cpu=machine.cpu,
        cores=machine.cores,
        onnxruntime=machine.onnxruntime,
        load_average_1m=machine.load_average[0] if machine.load_average else None,
        measured_at=machine.measured_at,
    )


def read_rows(path: Path) -> list[SweepRow]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [SweepRow.model_validate({k: (v if v != "" else None) for k, v in r.items()}) for r in csv.DictReader(f)]


def write_rows(rows: Sequence[SweepRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SweepRow.model_fields))
        writer.writeheader()
        writer.writerows(r.model_dump() for r in rows)
    partial.replace(path)


def measure_all(
    models: Sequence[tuple[ModelSpec, Path]],
    budget: Budget,
    csv_path: Path,
    keep: Sequence[SweepRow] = (),
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> list[SweepRow]:
    """Times every configuration of every model, one process each, a model's configurations back to back.

    Rows in `keep` (an earlier, interrupted run) are not measured again. The CSV is rewritten after each
    configuration, so an interruption loses at most one."""
    rows = list(keep)
    done = {r.key for r in rows}
    for spec, model_dir in models:
        manifest = load_manifest(model_dir)
        for config in configs_for(spec):
            if (spec.label, config) in done:
                continue
            measured = measure_isolated(
                MeasureSpec(
                    model_dir=model_dir,
                    rotation=(config,),
                    warmup=budget.warmup,
                    runs=budget.runs,
                    max_seconds=budget.max_seconds,
                )
            )
            rows.append(_row(spec, manifest, config, measured.machine, measured.results))
            log(f"[sweep] {spec.label:>8} {config:<20} {measured.results[config].brief()}")
            write_rows(rows, csv_path)
    return rows
