"""`python -m bench sweep`: the offline sweep. Builds single UNets and ensembles of them (reusing what an earlier
run built under --out), then times each model in each configuration (separate sessions in a loop with default or
tuned options, in parallel threads, fused), each in its own process. Writes sweep.csv, sweep.png, sweep.md; a
full run also docs/sweep.png and its section of docs/benchmarks.md. About 20 min on 2 cores.

Every distinct member is built once, as a single-member model directory (`OUT/<member name>/`). An ensemble's
directory gets copies of its members' files before its build, so the build reuses them (same fingerprint) and
only fuses and scores. Re-running skips whatever is up to date.
"""

from __future__ import annotations

import csv
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from bench.core import CONFIGS, Budget, Machine, MeasureSpec, Summary, alone, log, measure_isolated
from ensemble_contract.manifest import Manifest, load_manifest
from model_build.config import BuildConfig, Int8Config, MemberConfig, TrainingConfig

_TERM = re.compile(r"^(?:(\d+)x)?w(\d+)$")
SINGLE_CONFIGS = ("separate-default", "separate-nospin", "fused-default", "fused-nospin")

# The zoo.


@dataclass(frozen=True)
class ModelSpec:
    """A model of the sweep: its label ("w3", "2xw2", "w2+w7") and its members."""

    label: str
    members: tuple[MemberConfig, ...]

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @property
    def dir_name(self) -> str:
        return self.label.replace("+", "_") if self.is_ensemble else self.members[0].name

    @property
    def widths(self) -> str:
        return "+".join(str(m.width_scale) for m in self.members)


def single(width: int) -> ModelSpec:
    return ModelSpec(f"w{width}", (MemberConfig(width_scale=width, seed=1),))


def ensemble(label: str) -> ModelSpec:
    """Parses "2xw2", "w2+w3", "3xw2+w5": members of a width repeat with seeds 1, 2, ..."""
    seeds: Counter[int] = Counter()
    members = []
    for term in label.split("+"):
        match = _TERM.match(term.strip())
        if not match:
            raise ValueError(f"ensemble {label!r}: {term!r} is not like 'w3' or '2xw3'")
        count, width = int(match[1] or 1), int(match[2])
        for _ in range(count):
            seeds[width] += 1
            members.append(MemberConfig(width_scale=width, seed=seeds[width]))
    if len(members) < 2:
        raise ValueError(f"ensemble {label!r} has fewer than two members")
    return ModelSpec(label, tuple(members))


def of_model_dir(model_dir: Path) -> ModelSpec:
    """A model built elsewhere (e.g. models/default), measured as it is: labelled like "default:2xw2@48px"."""
    manifest = load_manifest(model_dir)
    widths = [m.width_scale for m in manifest.members]
    if None in widths:
        raise ValueError(f"{model_dir}: the manifest does not give every member's width_scale")
    counts = Counter(widths)
    terms = "+".join(f"{n}xw{w}" if n > 1 else f"w{w}" for w, n in counts.items())
    members = tuple(MemberConfig(width_scale=m.width_scale, seed=m.seed or 0) for m in manifest.members)
    return ModelSpec(f"{model_dir.name}:{terms}@{manifest.image.height}px", members)


def build_config(spec: ModelSpec, training: TrainingConfig, test_images: int) -> BuildConfig:
    name = f"sweep-{spec.dir_name}"
    # No int8 graph: the sweep times fp32 configurations; `python -m bench quant` covers int8.
    no_int8 = Int8Config(enabled=False)
    return BuildConfig(name=name, members=spec.members, training=training, test_images=test_images, int8=no_int8)


def _member_file(root: Path, member: MemberConfig) -> Path:
    return root / "members" / f"{member.name}.onnx"


def _build(spec: ModelSpec, training: TrainingConfig, test_images: int, out: Path, sources: Sequence[Path]) -> None:
    """Builds `spec` into `out`, first copying in each member that `out` lacks (or holds from another
    configuration) from the first of `sources` (model directories) that has it built with this one."""
    from model_build.build import build, is_built  # torch is imported only where a build runs

    config = build_config(spec, training, test_images)
    for member in config.members:
        target = _member_file(out, member)
        if is_built(target, config, member):
            continue
        source = next((p for p in (_member_file(s, member) for s in sources) if is_built(p, config, member)), None)
        if source is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    build(config, out)  # skips what is up to date, reuses matching members


def build_all(
    specs: Sequence[ModelSpec],
    training: TrainingConfig,
    test_images: int,
    root: Path,
    reuse_from: Sequence[Path] = (),
) -> dict[str, Path]:
    """Builds every model of `specs` under `root`; returns each label's model directory.

    Members train one after another, each on `training.threads` threads."""
    members = list(dict.fromkeys(m for spec in specs for m in spec.members))
    member_dirs = {m: root / m.name for m in members}
    for member in members:
        _build(ModelSpec(member.name, (member,)), training, test_images, member_dirs[member], reuse_from)
    dirs = {}
    for spec in specs:
        if spec.is_ensemble:
            dirs[spec.label] = root / spec.dir_name
            _build(spec, training, test_images, dirs[spec.label], [member_dirs[m] for m in spec.members])
        else:
            dirs[spec.label] = member_dirs[spec.members[0]]
    return dirs


# The measurements.


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
            measured = measure_isolated(MeasureSpec.of(model_dir, (config,), budget))
            rows.append(_row(spec, manifest, config, measured.machine, measured.results))
            log(f"[sweep] {spec.label:>8} {config:<20} {measured.results[config].brief()}")
            write_rows(rows, csv_path)
    return rows
