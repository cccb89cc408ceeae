"""`python -m bench sweep`: latency against accuracy across widths and ensembles, separate sessions against fused.

Builds single UNets and ensembles of them with model_build, on the synthetic shapes or on your labelled images
(`--data DIR`, the layout of docs/build.md; accuracy on its test split), `--reuse-members DIR` copying members built
the same way; times each model's configurations in interleaved rounds through the service's runtime, and writes
sweep.csv, sweep.png and sweep.md, which ends with the models on the Pareto front and what the fused graph saves;
`--from-csv docs/sweep.csv` re-renders them. ~20 min on 2 cores.
"""

from __future__ import annotations

import csv
import multiprocessing
import re
import shutil
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, field_serializer, field_validator

from app.engine.resources import usable_cores
from app.engine.timing import percentiles_ms
from app.settings import Settings, Spinning
from bench.common import Budget, Interval, Machine, Report, Setup, log, table, time_in_process
from ensemble_contract.manifest import Manifest, load_manifest
from ensemble_contract.modes import Mode
from model_build.config import BuildConfig, FolderData, Int8Config, MemberConfig, TrainingConfig
from model_build.folder import LabelledFolder

SEPARATE_OVER_FUSED_TARGET = 1.5  # the published 2.14x, with room for a machine of another kind
FUSED_OVER_SUM_TARGET = 1.10  # fusing saves no work: the fused graph costs about its members alone
WIDTHS = (2, 3, 4, 5, 6, 7)
ENSEMBLES = ("2xw2", "3xw2", "2xw3", "w2+w3", "w2+w7")
ALONE = "alone:"  # alone:<i>: member i of an ensemble by itself (its own model directory), spinning on
RATIOS = (("separate-default", "fused-default"), ("separate-nospin", "fused-nospin"), ("parallel", "fused-nospin"),
          ("fused-default", "sum alone"))  # fmt: skip


CONFIGS = {  # each way to run a model: a mode of the service's runtime, ONNX Runtime's default spinning (on) or off
    "separate-default": (Mode.SEQUENTIAL, True),
    "separate-nospin": (Mode.SEQUENTIAL, False),
    "parallel": (Mode.PARALLEL, False),
    "fused-default": (Mode.FUSED, True),
    "fused-nospin": (Mode.FUSED, False),
}
MODE_SUMMARY = {Mode.SEQUENTIAL: "separate sessions in a loop", Mode.FUSED: "one session on the fused graph",
        Mode.PARALLEL: "the members at once, cores // members threads each"}  # fmt: skip


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


def single(width: int) -> ModelSpec:
    return ModelSpec(f"w{width}", (MemberConfig(width_scale=width, seed=1),))


def ensemble(label: str) -> ModelSpec:
    """Parses "2xw2", "w2+w3", "3xw2+w5": members of a width repeat with seeds 1, 2, ..."""
    seeds: Counter[int] = Counter()
    members = []
    for term in label.split("+"):
        if not (match := re.fullmatch(r"(?:(\d+)x)?w(\d+)", term.strip())):
            raise ValueError(f"ensemble {label!r}: {term!r} is not like 'w3' or '2xw3'")
        for _ in range(int(match[1] or 1)):
            seeds[int(match[2])] += 1
            members.append(MemberConfig(width_scale=int(match[2]), seed=seeds[int(match[2])]))
    if len(members) < 2:
        raise ValueError(f"ensemble {label!r} has fewer than two members")
    return ModelSpec(label, tuple(members))


@dataclass(frozen=True)
class Training:
    """How every model of a sweep is trained and scored: on what, how long, on how many held-out images."""

    config: TrainingConfig
    test_images: int
    folder: LabelledFolder | None = None  # None: the synthetic shapes

    @property
    def data(self) -> FolderData | None:
        return None if self.folder is None else FolderData.of(self.folder)


def _build(spec: ModelSpec, out: Path, training: Training, sources: Sequence[Path]) -> None:
    """Builds `spec` into `out` (fp32 only), first copying in each member it lacks from the first of `sources`
    (model directories) that has it built the same way."""
    from model_build.build import build, is_built  # torch is imported only where a build runs

    config = BuildConfig(
        name=f"sweep-{spec.dir_name}",
        members=spec.members,
        training=training.config,
        data=training.data,
        test_images=training.test_images,
        int8=Int8Config(enabled=False),
    )
    for member in config.members:
        path = out / "members" / f"{member.name}.onnx"
        found = [s / "members" / path.name for s in sources if is_built(s / "members" / path.name, config, member)]
        if found and not is_built(path, config, member):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found[0], path)
    build(config, out, training.folder)


def build_all(
    specs: Sequence[ModelSpec], training: Training, root: Path, reuse: Sequence[Path] = ()
) -> dict[str, Path]:
    """Builds every model under `root`, the members first (a process each, as many as the cores hold at
    `training.config.threads` threads each); returns each label's model directory."""
    members = list(dict.fromkeys(m for spec in specs for m in spec.members))
    workers = max(1, min(len(members), usable_cores().count // training.config.threads))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = [pool.submit(_build, ModelSpec(m.name, (m,)), root / m.name, training, reuse) for m in members]
        for future in built:
            future.result()
    for spec in (s for s in specs if s.is_ensemble):
        _build(spec, root / spec.dir_name, training, [root / m.name for m in spec.members])
    return {spec.label: root / spec.dir_name for spec in specs}


class SweepRow(BaseModel):
    """One model in one configuration: a line of sweep.csv, its columns these fields."""

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
    mean_iou: float | None  # None: trained without masks
    cpu: str
    cores: int
    onnxruntime: str
    load_average_1m: float | None
    measured_at: str

    @field_validator("rounds_ms", mode="before")
    @classmethod
    def _from_csv(cls, value: object) -> object:
        return tuple(float(x) for x in value.split()) if isinstance(value, str) else value

    @field_serializer("rounds_ms")
    def _to_csv(self, value: tuple[float, ...]) -> str:
        return " ".join(f"{x:.4f}" for x in value)


def setups(spec: ModelSpec, model_dir: Path, root: Path) -> dict[str, Setup]:
    """A model's configurations: a single model has no `parallel` (it would run as `separate`); an ensemble also
    times each member alone."""
    found = {
        name: (Settings(model_dir=model_dir, spinning=Spinning.ALWAYS if spinning else Spinning.OFF), mode)
        for name, (mode, spinning) in CONFIGS.items()
        if spec.is_ensemble or mode is not Mode.PARALLEL
    }
    for i, member in enumerate(spec.members if spec.is_ensemble else ()):
        found[f"{ALONE}{i}"] = (Settings(model_dir=root / member.name, spinning=Spinning.ALWAYS), Mode.SEQUENTIAL)
    return found


def _row(spec: ModelSpec, manifest: Manifest, config: str, rounds: Sequence[Sequence[float]]) -> SweepRow:
    """`rounds`: each round's durations, in seconds."""
    p50, p95, p99 = zip(*(percentiles_ms(seconds, [50, 95, 99]) for seconds in rounds), strict=True)
    metrics = manifest.ensemble_metrics or manifest.members[0].metrics
    if metrics is None:
        raise ValueError(f"{spec.label}: the manifest has no held-out metrics")
    machine = Machine.current()
    return SweepRow(
        model=spec.label,
        kind="ensemble" if spec.is_ensemble else "single",
        widths="+".join(str(m.width_scale) for m in spec.members),
        members=len(spec.members),
        parameters=sum(m.parameters or 0 for m in manifest.members),
        image_size=manifest.image.height if manifest.image else 0,
        config=config,
        median_ms=statistics.median(p50),
        p95_ms=statistics.median(p95),
        p99_ms=statistics.median(p99),
        mean_ms=statistics.fmean(statistics.fmean(seconds) * 1000 for seconds in rounds),
        runs=sum(len(seconds) for seconds in rounds),
        rounds_ms=p50,
        training_steps=(manifest.build_config or {}).get("training", {}).get("steps", 0),
        load_average_1m=machine.load_average[0] if machine.load_average else None,
        **metrics.model_dump(include={"mean_label_accuracy", "exact_match_accuracy", "mean_iou"}),
        **{name: getattr(machine, name) for name in ("cpu", "cores", "onnxruntime", "measured_at")},
    )


def write_csv(path: Path, rows: Sequence[SweepRow]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SweepRow.model_fields))
        writer.writeheader()
        writer.writerows(row.model_dump() for row in rows)
    return path


def _by_model(rows: Sequence[SweepRow]) -> dict[str, dict[str, SweepRow]]:
    grouped: dict[str, dict[str, SweepRow]] = defaultdict(dict)
    for row in rows:
        grouped[row.model][row.config] = row
    return grouped


def _ratios(configs: dict[str, SweepRow]) -> tuple[list[float] | None, dict[str, Interval | None]]:
    """Per round, the sum of the members' medians alone (None: none timed); and the ratios of RATIOS, by column
    heading: each the mean of the rounds' ratios, with its 95 % interval."""
    rounds: dict[str, Sequence[float]] = {name: row.rounds_ms for name, row in configs.items()}
    alone = [row.rounds_ms for name, row in configs.items() if name.startswith(ALONE)]
    sums = [sum(per_round) for per_round in zip(*alone, strict=True)] if alone else None
    rounds |= {"sum alone": sums} if sums else {}
    ratios = {f"{n} ÷ {d}": Interval.of_ratios(rounds[n], rounds[d]) if {n, d} <= rounds.keys() else None
              for n, d in RATIOS}  # fmt: skip
    return sums, ratios


def markdown(rows: Sequence[SweepRow], header: str, target: str) -> str:
    grouped = _by_model(rows)
    names = [name for name in CONFIGS if any(name in configs for configs in grouped.values())]
    body = []
    for model, configs in grouped.items():
        first, (alone, ratios) = next(iter(configs.values())), _ratios(configs)
        cells: list[object] = [model, f"{first.parameters / 1e6:.2f}", f"{first.mean_label_accuracy:.3f}"]
        cells += [f"{configs[n].median_ms:.2f} ({configs[n].p95_ms:.2f})" if n in configs else "" for n in names]
        cells.append(statistics.median(alone) if alone else None)
        body.append(cells + [interval.brief() if interval else None for interval in ratios.values()])
    headers = ["model", "params (M)", "mean label acc.", *(f"{n} p50 (p95) ms" for n in names)]
    headers += ["sum of members alone, ms", *(f"{n} ÷ {d} [95 % CI]" for n, d in RATIOS)]
    spinning = {True: "spinning on (the default)", False: "spinning off"}
    legend = "\n".join(f"- `{n}`: {MODE_SUMMARY[CONFIGS[n][0]]}, {spinning[CONFIGS[n][1]]}" for n in names)
    claims = (
        ("fused ÷ sum of its members alone", "fused-default ÷ sum alone", None, FUSED_OVER_SUM_TARGET),
        ("separate sessions in a loop ÷ fused, spinning on", "separate-default ÷ fused-default",
         SEPARATE_OVER_FUSED_TARGET, None),
    )  # fmt: skip
    ratios = _ratios(grouped.get(target, {}))[1]
    checks = [
        f"- {interval.check(f'{target}: {name}', at_least=low, at_most=high)}"
        if (interval := ratios[column])
        else f"- not measured {target}: {name}"
        for name, column, low, high in claims
    ]
    against = f"Against the published claims (on `{target}`, batch 1; a bound holds where the whole 95 % interval is):"
    return "\n\n".join([header, table(headers, body), legend, against, "\n".join(checks), verdict(rows)])


def verdict(rows: Sequence[SweepRow]) -> str:
    """The closing line: the models on the Pareto front (single models, ensembles' fused graphs and separate
    sessions), and what each ensemble's fused graph saves against its separate sessions."""
    points: dict[tuple[float, float], str] = {}
    savings = []
    for model, configs in _by_model(rows).items():
        if (fused := configs.get("fused-default")) is None:
            continue
        ensemble = fused.kind == "ensemble"
        points[(fused.median_ms, fused.mean_label_accuracy)] = f"`{model}` fused" if ensemble else f"`{model}`"
        if ensemble and (separate := configs.get("separate-default")) is not None:
            points.setdefault((separate.median_ms, separate.mean_label_accuracy), f"`{model}` separate")
            ratio = Interval.of_ratios(separate.rounds_ms, fused.rounds_ms)
            if ratio.mean > 0:
                savings.append(f"`{model}` {1 - 1 / ratio.mean:.0%} (separate ÷ fused {ratio.brief()})")
    front = [points[point] for point in pareto_front(list(points))]
    ensembles = [name for name in front if name.endswith(("fused", "separate"))]
    lines = [
        f"**On this data and this machine**, the Pareto front (no other model both faster and more accurate): "
        f"{', '.join(front)}; " + (f"ensembles on it: {', '.join(ensembles)}." if ensembles else "no ensemble on it.")
    ]
    if savings:
        lines.append(f"The fused graph saves of the separate sessions' median time: {'; '.join(savings)}.")
    return " ".join(lines)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both counts (lower latency x, higher accuracy y), by latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(rows: Sequence[SweepRow], path: Path, subtitle: str) -> Path:
    """One point per model, median latency (x, log) against mean label accuracy (y), coloured by parameters; an
    arrow from an ensemble's separate sessions (spinning on) to its fused graph; the Pareto front as a step line."""
    import matplotlib  # only where a chart is drawn, to files only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, ScalarFormatter

    millions = [r.parameters / 1e6 for r in rows]
    norm, cmap = plt.Normalize(min(millions), max(millions)), plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(9, 6.5), dpi=110, layout="constrained")
    points: list[tuple[float, float]] = []
    for model, configs in _by_model(rows).items():
        if (fused := configs.get("fused-default")) is None:
            continue
        colour, at = cmap(norm(fused.parameters / 1e6)), (fused.median_ms, fused.mean_label_accuracy)
        points.append(at)
        if fused.kind == "ensemble" and (separate := configs.get("separate-default")) is not None:
            points.append(start := (separate.median_ms, separate.mean_label_accuracy))
            ax.scatter(*start, s=60, marker="D", facecolors="white", edgecolors=[colour], linewidths=1.6, zorder=3)
            arrow = {"arrowstyle": "-|>", "color": colour, "lw": 1.4, "shrinkA": 5, "shrinkB": 7, "mutation_scale": 14}
            ax.annotate("", at, start, arrowprops=arrow, zorder=6)
        marker = "s" if fused.kind == "ensemble" else "o"
        ax.scatter(*at, s=70, marker=marker, color=colour, edgecolors="black", linewidths=0.5, zorder=4)
        ax.annotate(model, at, textcoords="offset points", xytext=(6, 5), fontsize=8)
    xs, ys = zip(*pareto_front(points), strict=True)
    ax.step(xs, ys, where="post", color="tab:red", linewidth=1.2, alpha=0.8, zorder=1)
    ax.scatter(xs, ys, s=170, facecolors="none", edgecolors="tab:red", linewidths=1.2, zorder=5)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="total parameters (M)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # in plain numbers
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("median latency, batch 1, spinning on as ONNX Runtime's default (ms, log scale)")
    ax.set_ylabel("mean label accuracy (held out)")
    ax.set_title(f"Latency vs accuracy: single UNets and ensembles\n{subtitle}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    grey = {"color": "grey", "linestyle": ""}
    handles = [
        Line2D([], [], marker="o", **grey, label="single model"),
        Line2D([], [], marker="s", **grey, label="ensemble, fused graph"),
        Line2D([], [], marker="D", markerfacecolor="white", **grey, label="ensemble, separate sessions"),
        Line2D([], [], marker=r"$\rightarrow$", markersize=12, **grey, label="separate → fused"),
        Line2D([], [], color="tab:red", label="Pareto front (faster and more accurate)"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.savefig(path)
    plt.close(fig)
    return path


def render(rows: Sequence[SweepRow], out: Path, what: str, measured_on: str | None = None) -> Report:
    """The report, chart and CSV of a run's rows (`what`: how they were built and timed)."""
    if not rows:
        raise SystemExit("no sweep rows to render")
    ensembles = [r.model for r in rows if r.kind == "ensemble"]
    target = "2xw2" if "2xw2" in ensembles else (ensembles or ["2xw2"])[0]
    what += (
        f" Bounds checked on `{target}`. Latencies are the median over rounds of each round's p50 (p95), in ms; "
        "ratios are the mean of the rounds' ratios with its 95 % t-interval. Compare only ratios measured in one run. "
        "The chart plots each model's fused-default latency (a single model: its one session) and, for an ensemble, "
        "its separate-default latency too; the data is [sweep.csv](sweep.csv)."
    )
    data = write_csv(out / "sweep.csv", rows)
    chart = plot(rows, out / "sweep.png", f"{rows[0].cpu}, {rows[0].cores} cores, {rows[0].measured_at}")
    return Report(markdown(rows, what, target), figure=chart, data=data, measured_on=measured_on)


def rerender(csv_path: Path, out: Path) -> Report:
    """The report of an earlier run from its CSV, saying what it was measured on."""
    with csv_path.open(newline="") as f:
        rows = [SweepRow.model_validate({k: v or None for k, v in row.items()}) for row in csv.DictReader(f)]
    loads = [r.load_average_1m for r in rows if r.load_average_1m is not None] or [float("nan")]
    first, times = rows[0], sorted(r.measured_at for r in rows)
    measured_on = (
        f"{first.cpu}, {first.cores} cores, onnxruntime {first.onnxruntime}, from {times[0]} to {times[-1]}, "
        f"1-minute load average {min(loads):.2f}-{max(loads):.2f}"
    )
    what = f"Sweep models trained {first.training_steps} steps at {first.image_size}x{first.image_size}."
    return render(rows, out, what, measured_on)


def run(
    specs: Sequence[ModelSpec],
    training: Training,
    reuse: Sequence[Path],
    budget: Budget,
    rounds: int,
    out: Path,
) -> Report:
    """Builds every model, then times them one after another; the CSV is rewritten after each model, so that an
    interruption keeps what was measured."""
    log(f"[sweep] building {len(specs)} models into {out / 'models'} (up-to-date ones are skipped)")
    dirs = build_all(specs, training, out / "models", reuse)
    rows: list[SweepRow] = []
    for spec in specs:
        manifest = load_manifest(dirs[spec.label])
        for config, timed in time_in_process(setups(spec, dirs[spec.label], out / "models"), budget, rounds).items():
            rows.append(_row(spec, manifest, config, timed))
            log(f"[sweep] {spec.label:>8} {config:<18} p50 {rows[-1].median_ms:.2f} ms, rounds {rows[-1].rounds_ms}")
        write_csv(out / "sweep.csv", rows)
    config, folder = training.config, training.folder
    on = "the synthetic shapes" if folder is None else f"`{folder.root.name}` ({len(folder.examples)} images)"
    held_out = f"{training.test_images} held-out images" if folder is None else "its test split"
    what = (
        f"Sweep models trained on {on}, {config.steps} steps at {config.size[0]}x{config.size[1]}, batch "
        f"{config.batch_size}, on {config.threads} thread(s); accuracy on {held_out}. Each "
        "model's configurations run through the service's runtime in one process, one runtime per spinning setting, "
        f"timed in {rounds} interleaved rounds (the order rotated each round): per round {budget.warmup} warm-up runs, "
        f"then {budget.runs} timed runs (at most {budget.max_seconds:g} s), batch 1."
    )
    return render(rows, out, what)
