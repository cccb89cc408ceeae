"""`python -m bench scale`: the sweep's question across input sizes. Is the fusion gain a fixed cost per run, which
larger inputs dilute, or does it persist at the published scale?

The build's exporter fixes height and width, so a pair of width-2 members (4 training steps: latency does not depend
on the weights) is built and fused by model_build at each size, and at the size where the pair as separate sessions
in a loop, spinning on, costs what the published loop did (172 ms; found by probing). Then, per size, separate
sessions in a loop (`sequential`) and the fused graph run through the service's runtime in this process, in
interleaved rounds, per layout: all cores with spinning on (ONNX Runtime's default), all cores with spinning off,
and one intra-op thread (no pool, nothing spins). Writes scale.csv, scale.png (separate ÷ fused against input size)
and scale.md; a full run also rewrites its section of docs/benchmarks.md. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.engine.resources import usable_cores
from app.settings import Settings, Spinning
from bench.common import (
    Budget,
    Interval,
    Machine,
    Report,
    interval_check,
    log,
    log_axis,
    pyplot,
    table,
    time_in_process,
    write_csv,
)
from bench.sweep import SEPARATE_OVER_FUSED_TARGET as TARGET
from ensemble_contract.modes import Mode
from model_build.config import BuildConfig, Int8Config, MemberConfig, TrainingConfig

# The published experiment (Niville, Ixor, 2022): two members as separate sessions in a loop, and fused.
PUBLISHED_SEPARATE_MS, PUBLISHED_FUSED_MS = 172.27, 80.47
PUBLISHED_RATIO = PUBLISHED_SEPARATE_MS / PUBLISHED_FUSED_MS
MEMBERS = (MemberConfig(width_scale=2, seed=1), MemberConfig(width_scale=2, seed=2))
TRAINING_STEPS = 4  # enough to run the build's own training path
SIZE_STEP, MAX_SIZE = 16, 512  # the UNet's input is a multiple of 16; TrainingConfig's largest image
MAX_PROBES = 5
TARGET_TOLERANCE = 1.1  # a probe within 10 % of the target latency ends the search


@dataclass(frozen=True)
class Layout:
    """The sessions of both sides: intra-op threads, and whether their pools spin."""

    threads: int
    spinning: bool

    @property
    def name(self) -> str:
        if self.threads == 1:
            return "1 thread"
        return f"{self.threads} threads, spinning {'on (default)' if self.spinning else 'off'}"

    def settings(self, model_dir: Path) -> Settings:
        threads = {"fused_intra_op_threads": self.threads, "sequential_intra_op_threads": self.threads}
        spinning = Spinning.ALWAYS if self.spinning else Spinning.OFF  # on: ONNX Runtime's default
        return Settings(model_dir=model_dir, spinning=spinning, **threads)


@dataclass(frozen=True)
class ScaleRow:
    size: int
    layout: Layout
    separate_ms: float  # the median of the rounds' medians
    fused_ms: float
    ratio: Interval  # separate ÷ fused: the mean of the rounds' ratios
    saved_ms: Interval  # separate - fused: the mean of the rounds' differences
    runs: int  # timed runs of each side, all rounds together
    load_average_1m: float | None

    def csv_row(self) -> dict[str, object]:
        """A line of scale.csv: each interval as its mean, low and high."""
        row: dict[str, object] = {"size": self.size, "threads": self.layout.threads, "spinning": self.layout.spinning}
        row |= {"separate_ms": self.separate_ms, "fused_ms": self.fused_ms}
        for name, interval in (("ratio", self.ratio), ("saved_ms", self.saved_ms)):
            row |= {name: interval.mean, f"{name}_low": interval.low, f"{name}_high": interval.high}
        return row | {"runs": self.runs, "load_average_1m": self.load_average_1m}


def build_at(size: int, root: Path) -> Path:
    """The width-2 pair at `size` x `size`, built and fused by model_build (reused when up to date)."""
    from model_build.build import build  # torch is imported only where a build runs

    training = TrainingConfig(image_size=size, batch_size=2, steps=TRAINING_STEPS, threads=1)
    config = BuildConfig(
        name=f"scale-{size}px",
        members=MEMBERS,
        training=training,
        test_images=1,
        int8=Int8Config(enabled=False),
        parallel_training=False,
    )
    build(config, root / f"{size}px")
    return root / f"{size}px"


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


def measure(size: int, model_dir: Path, layouts: Sequence[Layout], budget: Budget, rounds: int) -> list[ScaleRow]:
    """Both sides of every layout at one size, in interleaved rounds."""
    sides = {"separate": Mode.SEQUENTIAL, "fused": Mode.FUSED}
    setups = {(layout, side): (layout.settings(model_dir), mode) for layout in layouts for side, mode in sides.items()}
    named = {f"{layout.name} | {side}": setup for (layout, side), setup in setups.items()}
    timed = time_in_process(named, budget, rounds)
    machine = Machine.current()
    rows = []
    for layout in layouts:
        separate, fused = ([statistics.median(s) * 1000 for s in timed[f"{layout.name} | {side}"]] for side in sides)
        rows.append(
            ScaleRow(
                size=size,
                layout=layout,
                separate_ms=statistics.median(separate),
                fused_ms=statistics.median(fused),
                ratio=Interval.of_ratios(separate, fused),
                saved_ms=Interval.of([s - f for s, f in zip(separate, fused, strict=True)]),
                runs=sum(len(s) for s in timed[f"{layout.name} | separate"]),
                load_average_1m=machine.load_average[0] if machine.load_average else None,
            )
        )
        log(f"[scale] {size:>4}px {layout.name:<30} separate ÷ fused {rows[-1].ratio}")
    return rows


def target_lines(rows: Sequence[ScaleRow], published: int) -> list[str]:
    """At the published scale, per layout: separate ÷ fused against the sweep's target."""
    return [
        interval_check(f"{r.size}px, {r.layout.name}: separate sessions in a loop ÷ fused", r.ratio, at_least=TARGET)
        for r in rows
        if r.size == published
    ]


def markdown(rows: Sequence[ScaleRow], header: str, published: int) -> str:
    body = [
        [
            f"**{r.size}**" if r.size == published else r.size,
            r.layout.name,
            r.separate_ms,
            r.fused_ms,
            r.ratio.brief(),
            r.saved_ms.brief(),
            r.load_average_1m,
        ]
        for r in rows
    ]
    headers = ["size (px)", "layout (both sides)", "separate p50 ms", "fused p50 ms", "separate ÷ fused [95 % CI]"]
    headers += ["separate - fused, ms [95 % CI]", "load (1 min)"]
    targets = "\n".join(f"- {line}" for line in target_lines(rows, published))
    against = f"Against the published 2.14x (at {published}px; a bound holds only where the whole 95 % interval is):"
    return "\n\n".join([header, table(headers, body), against, targets])


def plot(rows: Sequence[ScaleRow], published: int, path: Path, subtitle: str) -> Path:
    """Left: separate ÷ fused against input size, a line per layout with 95 % error bars, 1.0 and the published
    2.14x marked. Right: both sides' latencies (log-log)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), dpi=100, layout="constrained")
    sizes = sorted({r.size for r in rows})
    for i, layout in enumerate(dict.fromkeys(r.layout for r in rows)):
        mine = sorted((r for r in rows if r.layout == layout), key=lambda r: r.size)
        xs, ratios = [r.size for r in mine], [r.ratio for r in mine]
        errors = [[ci.mean - ci.low for ci in ratios], [ci.high - ci.mean for ci in ratios]]
        errors = [[e if math.isfinite(e) else 0.0 for e in side] for side in errors]
        left.errorbar(
            xs, [ci.mean for ci in ratios], yerr=errors, marker="o", capsize=4, color=f"C{i}", label=layout.name
        )
        right.plot(xs, [r.separate_ms for r in mine], "D--", color=f"C{i}", label=f"separate, {layout.name}")
        right.plot(xs, [r.fused_ms for r in mine], "s-", color=f"C{i}", label=f"fused, {layout.name}")
    left.axhline(1.0, color="grey", linewidth=1)
    left.axhline(PUBLISHED_RATIO, color="tab:red", linestyle=":", label=f"published: {PUBLISHED_RATIO:.2f}x")
    for ax in (left, right):
        ax.axvline(published, color="black", linestyle=":", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel(f"input size (px, square; dotted: {published}px, the published loop's ~172 ms)")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("separate sessions in a loop ÷ fused (mean of rounds, 95 % CI)")
    left.legend(fontsize=8)
    right.set_yscale("log")
    log_axis(right.yaxis)
    right.set_ylabel("median latency, ms (log)")
    right.legend(fontsize=7)
    fig.suptitle(f"Two width-2 UNets: separate vs fused across input sizes\n{subtitle}", fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(
    sizes: Sequence[int], target_ms: float, largest: int, budget: Budget, probe: Budget, rounds: int, out: Path
) -> Report:
    """Builds the pair at `sizes`, finds the size where it costs `target_ms` in a loop with spinning on (probed with
    `probe`, starting from the largest of `sizes`, up to `largest`), then measures every size."""
    cores = usable_cores().count
    layouts = [Layout(cores, True), Layout(cores, False), Layout(1, True)] if cores > 1 else [Layout(1, True)]
    dirs = {size: build_at(size, out / "models") for size in sizes}

    def published_loop_ms(size: int) -> float:
        if size not in dirs:
            dirs[size] = build_at(size, out / "models")
        timed = time_in_process({"probe": (layouts[0].settings(dirs[size]), Mode.SEQUENTIAL)}, probe, 1)
        return statistics.median(timed["probe"][0]) * 1000

    published = size_for(target_ms, published_loop_ms, start=max(sizes), largest=largest)
    rows = [row for size in sorted({*sizes, published}) for row in measure(size, dirs[size], layouts, budget, rounds)]
    header = (
        f"Two width-2 members ({TRAINING_STEPS} training steps: latency does not depend on the weights) exported and "
        f"fused by model_build at each size; **{published}px** is where the pair as separate sessions in a loop with "
        f"spinning on took nearest {target_ms:g} ms (the published loop's cost) when probed. Per size, both sides of "
        "every layout through the service's runtime in one process, timed in "
        f"{rounds} interleaved rounds (the order rotated each round): per round {budget.warmup} warm-up runs, then "
        f"{budget.runs} timed runs (at most {budget.max_seconds:g} s), batch 1. Latencies are the median of the "
        "rounds' medians; ratios and differences the mean of the rounds' with its 95 % t-interval. Both sides of a "
        "row use the same threads and spinning."
    )
    data = write_csv(out / "scale.csv", [row.csv_row() for row in rows])
    chart = plot(rows, published, out / "scale.png", Machine.current().describe())
    return Report(markdown(rows, header, published), figure=chart, data=data)
