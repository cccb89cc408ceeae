"""`python -m bench sweep`: the offline sweep. Builds single UNets and ensembles of them (reusing what an earlier
run built under --out), then times each model in each configuration (separate sessions in a loop with default or
tuned options, in parallel threads, fused), each in a process of its own, a model's configurations in interleaved
rounds. Writes sweep.csv, sweep.png (latency against accuracy), sweep.md; a full run also docs/sweep.png, its CSV
and its section of docs/benchmarks.md. About 20 min on 2 cores (--from-csv re-renders them without a run).

`python -m bench scale`: the same question across input sizes. The members are fully convolutional, so a pair of
width-2 members (briefly trained: latency does not depend on the weights) is built and fused by the build's own
code at each size, and at the size where the pair in a loop costs what the published loop did (170 ms, found by
probing); then separate sessions in a loop and the fused graph are timed in interleaved rounds, per thread and
spinning layout. Writes scale.json, scale.png (separate ÷ fused against input size), scale.md.

Every distinct member is built once, as a single-member model directory (`OUT/<member name>/`). An ensemble's
directory gets copies of its members' files before its build, so the build reuses them (same fingerprint) and
only fuses and scores. Re-running skips whatever is up to date.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import re
import shutil
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_serializer, field_validator

from app.engine.resources import available_cores
from bench.core import (
    CONFIGS,
    Budget,
    Interval,
    Measurement,
    MeasureSpec,
    alone,
    log,
    mean_load,
    measure_interleaved,
    measure_isolated,
)
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

    Members train at once, as many as the cores hold at `training.threads` threads each, each in a process of its
    own (trained one after another on one thread each, they left one of two cores idle)."""
    members = list(dict.fromkeys(m for spec in specs for m in spec.members))
    member_dirs = {m: root / m.name for m in members}
    workers = max(1, min(len(members), available_cores() // training.threads))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        builds = [
            pool.submit(_build, ModelSpec(m.name, (m,)), training, test_images, member_dirs[m], reuse_from)
            for m in members
        ]
        for build in builds:
            build.result()
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
    median_ms: float  # the median of the rounds' medians; p95 and p99 likewise
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int  # timed runs, all rounds together
    rounds_ms: tuple[float, ...]  # each round's median, in round order
    training_steps: int
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

    @field_validator("rounds_ms", mode="before")
    @classmethod
    def _from_csv(cls, value: object) -> object:
        return tuple(float(x) for x in value.split()) if isinstance(value, str) else value

    @field_serializer("rounds_ms")
    def _to_csv(self, value: tuple[float, ...]) -> str:
        return " ".join(f"{x:.4f}" for x in value)


def configs_for(spec: ModelSpec) -> list[str]:
    """A single model runs the same alone, separate or in parallel, so it gets fewer configurations."""
    if not spec.is_ensemble:
        return list(SINGLE_CONFIGS)
    return [*CONFIGS, *(alone(i).name for i in range(len(spec.members)))]


def _row(spec: ModelSpec, manifest: Manifest, config: str, rounds: Sequence[Measurement]) -> SweepRow:
    metrics = manifest.ensemble_metrics or manifest.members[0].metrics
    if metrics is None:
        raise ValueError(f"{spec.label}: the manifest has no held-out metrics")
    summaries = [m.results[config] for m in rounds]
    machine = rounds[0].machine
    return SweepRow(
        model=spec.label,
        kind="ensemble" if spec.is_ensemble else "single",
        widths=spec.widths,
        members=len(spec.members),
        parameters=sum(m.parameters or 0 for m in manifest.members),
        image_size=manifest.image.height if manifest.image else 0,
        config=config,
        median_ms=statistics.median(s.median_ms for s in summaries),
        p95_ms=statistics.median(s.p95_ms for s in summaries),
        p99_ms=statistics.median(s.p99_ms for s in summaries),
        mean_ms=statistics.fmean(s.mean_ms for s in summaries),
        runs=sum(s.count for s in summaries),
        rounds_ms=tuple(s.median_ms for s in summaries),
        training_steps=(manifest.build_config or {}).get("training", {}).get("steps", 0),
        mean_label_accuracy=metrics.mean_label_accuracy,
        exact_match_accuracy=metrics.exact_match_accuracy,
        mean_iou=metrics.mean_iou,
        cpu=machine.cpu,
        cores=machine.cores,
        onnxruntime=machine.onnxruntime,
        load_average_1m=mean_load(rounds),
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
    rounds: int,
    csv_path: Path,
    keep: Sequence[SweepRow] = (),
) -> list[SweepRow]:
    """Times every configuration of every model: a model's configurations each in a process of its own, in
    `rounds` interleaved rounds of `budget` each, one model after another.

    Rows in `keep` (an earlier, interrupted run) are not measured again. The CSV is rewritten after each model,
    so an interruption loses at most one."""
    rows = list(keep)
    done = {r.key for r in rows}
    for spec, model_dir in models:
        manifest = load_manifest(model_dir)
        todo = [c for c in configs_for(spec) if (spec.label, c) not in done]
        if not todo:
            continue
        measured = measure_interleaved({c: MeasureSpec.of(model_dir, (c,), budget) for c in todo}, rounds)
        for config in todo:
            rows.append(_row(spec, manifest, config, measured[config]))
            log(f"[sweep] {spec.label:>8} {config:<20} p50 {rows[-1].median_ms:.2f} ms, rounds {rows[-1].rounds_ms}")
        write_rows(rows, csv_path)
    return rows


# Input size: a width-2 pair at each size, separate against fused, per thread and spinning layout.

# The published experiment (Niville, Ixor, 2022): two members as separate sessions in a loop, and fused.
PUBLISHED_SEPARATE_MS, PUBLISHED_FUSED_MS = 172.27, 80.47
SCALE_MEMBERS = (MemberConfig(width_scale=2, seed=1), MemberConfig(width_scale=2, seed=2))
SCALE_STEPS = 4  # latency does not depend on the weights: enough to run the build's own training path
SIZE_STEP, MAX_SIZE = 16, 512  # the UNet's input is a multiple of 16; TrainingConfig's largest image
MAX_PROBES = 5
TARGET_TOLERANCE = 1.1  # a probe within 10 % of the target latency ends the search


@dataclass(frozen=True)
class ScaleLayout:
    """How the sessions of both sides are set up: intra-op threads, and whether their pools spin (ORT's default)."""

    threads: int
    spinning: bool

    @property
    def name(self) -> str:
        if self.threads == 1:
            return "1 thread"  # no intra-op pool: the caller's thread runs everything, nothing spins
        return f"{self.threads} threads, spinning {'on (default)' if self.spinning else 'off'}"

    @property
    def configs(self) -> tuple[str, str]:
        """The separate and fused runner configurations (bench.core.CONFIGS)."""
        suffix = "default" if self.spinning else "nospin"
        return f"separate-{suffix}", f"fused-{suffix}"


def scale_layouts(cores: int) -> tuple[ScaleLayout, ...]:
    return (ScaleLayout(cores, True), ScaleLayout(cores, False), ScaleLayout(1, True))


def build_at(size: int, root: Path) -> Path:
    """The width-2 pair at `size` x `size`, built and fused by model_build (reused when up to date)."""
    from model_build.build import build

    training = TrainingConfig(image_size=size, batch_size=2, steps=SCALE_STEPS, threads=1)
    config = BuildConfig(
        name=f"scale-{size}px",
        members=SCALE_MEMBERS,
        training=training,
        test_images=1,
        int8=Int8Config(enabled=False),
        parallel_training=False,
    )
    out = root / f"{size}px"
    build(config, out)
    return out


def size_for(target_ms: float, latency_ms: Callable[[int], float], start: int, largest: int = MAX_SIZE) -> int:
    """The input size (a multiple of 16, at most `largest`) whose latency is nearest `target_ms`, found by probing:
    latency grows about with the pixels, so each probe aims at the size whose pixel count scales by target /
    measured, moving at most a doubling (or halving) of the side at a time."""
    probed: dict[int, float] = {}
    size = start
    while len(probed) < MAX_PROBES:
        probed[size] = latency_ms(size)
        log(f"[scale] probe {size}px: {probed[size]:.1f} ms (target {target_ms:g} ms)")
        if abs(math.log(probed[size] / target_ms)) < math.log(TARGET_TOLERANCE):
            break
        factor = min(2.0, max(0.5, math.sqrt(target_ms / probed[size])))
        following = min(largest, max(SIZE_STEP, round(size * factor / SIZE_STEP) * SIZE_STEP))
        if following in probed:
            break
        size = following
    return min(probed, key=lambda s: abs(math.log(probed[s] / target_ms)))


class ScaleRow(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")  # one round's interval is unbounded: Infinity

    size: int
    layout: str
    threads: int
    spinning: bool
    separate_ms: float  # the median of the rounds' medians
    fused_ms: float
    ratio: Interval  # separate ÷ fused: the mean of the rounds' ratios, with its 95 % interval
    saved_ms: Interval  # separate - fused: the mean of the rounds' differences, with its 95 % interval
    rounds: int
    runs: int  # timed runs of each side, all rounds together
    load_average_1m: float | None


def _scale_row(
    size: int, layout: ScaleLayout, separate: Sequence[Measurement], fused: Sequence[Measurement]
) -> ScaleRow:
    sep_config, fused_config = layout.configs
    sep_ms = [m.results[sep_config].median_ms for m in separate]
    fused_ms = [m.results[fused_config].median_ms for m in fused]
    return ScaleRow(
        size=size,
        layout=layout.name,
        threads=layout.threads,
        spinning=layout.spinning,
        separate_ms=statistics.median(sep_ms),
        fused_ms=statistics.median(fused_ms),
        ratio=Interval.of_ratios(sep_ms, fused_ms),
        saved_ms=Interval.of([s - f for s, f in zip(sep_ms, fused_ms, strict=True)]),
        rounds=len(sep_ms),
        runs=sum(m.results[sep_config].count for m in separate),
        load_average_1m=mean_load([*separate, *fused]),
    )


def measure_scale(dirs: dict[int, Path], layouts: Sequence[ScaleLayout], budget: Budget, rounds: int) -> list[ScaleRow]:
    """Per size: both sides of every layout, each in a process of its own, in `rounds` interleaved rounds."""
    rows = []
    for size, model_dir in sorted(dirs.items()):
        specs = {
            f"{layout.name} | {config}": MeasureSpec.of(model_dir, (config,), budget, intra_op_threads=layout.threads)
            for layout in layouts
            for config in layout.configs
        }
        measured = measure_interleaved(specs, rounds)
        for layout in layouts:
            separate, fused = (measured[f"{layout.name} | {config}"] for config in layout.configs)
            rows.append(_scale_row(size, layout, separate, fused))
            log(f"[scale] {size:>4}px {layout.name:<30} separate ÷ fused {rows[-1].ratio}")
    return rows


def run_scale(
    sizes: Sequence[int],
    target_ms: float,
    largest: int,
    budget: Budget,
    probe: Budget,
    rounds: int,
    root: Path,
) -> tuple[int, list[ScaleRow]]:
    """Builds the pair at `sizes`, finds the size where it costs `target_ms` in a loop with default options (the
    published loop; probed with `probe`, starting from the largest of `sizes`), then measures them all. Returns
    that size and the rows."""
    layouts = scale_layouts(available_cores())
    dirs = {size: build_at(size, root) for size in sizes}

    def published_loop_ms(size: int) -> float:
        if size not in dirs:
            dirs[size] = build_at(size, root)
        spec = MeasureSpec.of(dirs[size], ("separate-default",), probe, intra_op_threads=layouts[0].threads)
        return measure_isolated(spec).results["separate-default"].median_ms

    published = size_for(target_ms, published_loop_ms, start=max(sizes), largest=largest)
    measured = {size: dirs[size] for size in {*sizes, published}}
    return published, measure_scale(measured, layouts, budget, rounds)
