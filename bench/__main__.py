"""Command line: `python -m bench sweep|scale|load|interference|quant|compare|layouts|peers ...`; `--help` on each.

Full runs take minutes and rewrite their own section of docs/benchmarks.md; `--quick` runs take seconds,
write only under --out, and exist for the smoke tests. Run from the repository root.

What each command does with its parsed arguments: run the measurement (its own module: bench.sweep, bench.load,
...), write the results under --out, rewrite its own section of docs/benchmarks.md (full runs only, unless --docs
is given), print its targets. Each command imports its experiment only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from app.engine.resources import available_cores
from bench.core import Budget, Check, Machine, log
from bench.sweep import PUBLISHED_SEPARATE_MS, SweepRow

DOCS = Path("docs/benchmarks.md")
ARTIFACTS = Path("artifacts/bench")
DEFAULT_MODEL_DIR = Path("models/default")

# (full, --quick) per command; --runs replaces the timed runs of either.
BUDGETS: dict[str, tuple[Budget, Budget]] = {
    "sweep": (Budget(10, 60, 12), Budget(3, 20, 5)),  # per round
    "scale": (Budget(3, 30, 2), Budget(1, 5, 1)),  # per round
    "load": (Budget(50, 1000, 30), Budget(3, 20, 5)),  # the in-process floor
    "interference": (Budget(50, 1000, 60), Budget(3, 20, 5)),
    "quant": (Budget(30, 300, 60), Budget(3, 20, 5)),
}
SWEEP_WIDTHS = ((2, 3, 4, 5, 6, 7), (2, 3))
SWEEP_ENSEMBLES = (("2xw2", "3xw2", "2xw3", "w2+w3", "w2+w7"), ("2xw2", "w2+w3"))
SWEEP_CSV = "sweep.csv"
SWEEP_IMAGE_SIZE, SWEEP_STEPS, SWEEP_BATCH, SWEEP_TEST_IMAGES = 32, 400, 16, 500
ROUNDS = {"sweep": (5, 2), "scale": (6, 2)}  # interleaved rounds, (full, --quick)
SCALE_SIZES = ((48, 96, 192, 384), (32,))
SCALE_LARGEST = (512, 32)  # the largest size probed for it; quick: no larger than its one size, so no other build
SCALE_PROBE = Budget(2, 10, 5)
LOAD_REQUESTS, LOAD_MAX_S = (1000, 12), (30.0, 10.0)  # per load point
QUANT_CALIBRATION_IMAGES = (200, 16)
OVERLOAD_ROUNDS, OVERLOAD_SECONDS = (3, 2), (10.0, 1.0)  # the load command's overload rounds, and each window


T = TypeVar("T")


def _pick(args: argparse.Namespace, pair: tuple[T, T]) -> T:
    return pair[1] if args.quick else pair[0]


def _budget(args: argparse.Namespace) -> Budget:
    full, quick = BUDGETS[args.command]
    budget = quick if args.quick else full
    return Budget(budget.warmup, args.runs or budget.runs, budget.max_seconds)


def _rounds(args: argparse.Namespace) -> int:
    return int(args.rounds or _pick(args, ROUNDS[args.command]))


def _out(args: argparse.Namespace) -> Path:
    out: Path = args.out or ARTIFACTS / (args.command + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _copy(file: Path, directory: Path, name: str | None = None) -> None:
    """Copies `file` into `directory`, as `name` if given (unless it is that file already)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (name or file.name)
    if file.resolve() != target.resolve():
        shutil.copyfile(file, target)


def _publish(
    args: argparse.Namespace,
    argv: Sequence[str],
    out: Path,
    text: str,
    checks: Sequence[Check],
    *,
    results: BaseModel | Sequence[BaseModel] | None = None,
    figure: Path | None = None,
    lines: Sequence[str] = (),
    measured: str | None = None,
    data: Path | None = None,
) -> None:
    """Writes OUT/<command>.md, `text` after what it was measured on and by which command (and the results as
    OUT/<command>.json: an object, or an array of one row per line); rewrites the command's section of the docs
    (and copies the figure and the `data` file next to them, since artifacts/ is not committed) when asked; prints
    the targets (`checks`, and `lines` of targets checked on intervals). `measured` replaces "Measured on <this
    machine, now> by <this command>" for a report re-rendered from an earlier run's data."""
    from bench.report import update_section

    name = args.command
    measured = measured or f"Measured on {Machine.current().describe()} by `python -m bench {shlex.join(argv)}`."
    text = f"{measured} {text}"
    if isinstance(results, BaseModel):
        (out / f"{name}.json").write_text(results.model_dump_json(indent=2) + "\n")
    elif results is not None:
        (out / f"{name}.json").write_text("[" + ",\n".join(row.model_dump_json() for row in results) + "]\n")
    (out / f"{name}.md").write_text(text + (f"\n\n![{name}]({figure.name})" if figure else "") + "\n")
    docs = None if args.no_docs else args.docs or (None if args.quick else DOCS)
    if docs:
        for file in (f for f in (data, figure) if f):
            _copy(file, docs.parent)
        if figure:
            text += f"\n\n![{name}]({figure.name})"
        update_section(docs, name, text)
    for check in checks:
        log(f"[{name}] " + " | ".join(check.row()))
    for line in lines:
        log(f"[{name}] {line}")
    log(f"[{name}] wrote {out}{f' and {docs}' if docs else ''}")


def sweep(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.sweep import build_all, ensemble, measure_all, of_model_dir, read_rows, single
    from model_build.config import PRESETS, TrainingConfig

    if args.from_csv:
        _render_sweep(args, argv, read_rows(args.from_csv))
        return
    widths = args.widths or _pick(args, SWEEP_WIDTHS)
    labels = args.ensembles if args.ensembles is not None else _pick(args, SWEEP_ENSEMBLES)
    specs = [single(w) for w in widths] + [ensemble(label) for label in labels]
    if args.quick:  # like the test preset, so that its members can be reused
        base, test_images = PRESETS["test"].training, PRESETS["test"].test_images
    else:
        base = TrainingConfig(
            image_size=SWEEP_IMAGE_SIZE, batch_size=SWEEP_BATCH, steps=SWEEP_STEPS, threads=available_cores()
        )
        test_images = SWEEP_TEST_IMAGES
    changes = {"steps": args.steps, "image_size": args.image_size, "threads": args.threads}
    training = base.model_copy(update={k: v for k, v in changes.items() if v is not None})
    test_images = args.test_images or test_images
    budget, rounds, out = _budget(args), _rounds(args), _out(args)
    log(f"[sweep] building {len(specs)} models into {out / 'models'} (up-to-date ones are skipped)")
    dirs = build_all(specs, training, test_images, out / "models", reuse_from=args.reuse_members)
    models = [(s, dirs[s.label]) for s in specs]
    targets_dir = args.targets_model_dir or (None if args.quick else DEFAULT_MODEL_DIR)
    if targets_dir and (targets_dir / "manifest.json").is_file():
        models.append((of_model_dir(targets_dir), targets_dir))
    elif targets_dir:
        log(f"[sweep] {targets_dir} has no manifest.json: the targets are checked on the sweep's own 2xw2")
    csv_path = out / "sweep.csv"
    rows = measure_all(models, budget, rounds, csv_path, read_rows(csv_path) if args.resume else [])
    what = (
        f"Sweep models trained {training.steps} steps at {training.image_size}x{training.image_size}, batch "
        f"{training.batch_size}, on {training.threads} thread(s); accuracy on {test_images} held-out images. "
        f"Each model's configurations each in a process of its own, timed in {rounds} interleaved rounds (the order "
        f"rotated each round): per round {budget.warmup} warm-up runs, then {budget.runs} timed runs (at most "
        f"{budget.max_seconds:g} s), batch 1."
    )
    _render_sweep(args, argv, rows, what, csv_path)


def _render_sweep(
    args: argparse.Namespace,
    argv: Sequence[str],
    rows: Sequence[SweepRow],
    what: str | None = None,
    csv_path: Path | None = None,
) -> None:
    """The sweep's table, chart and targets from its rows: a run's, or an earlier run's CSV (--from-csv)."""
    from bench.report import plot_sweep, sweep_lines, sweep_markdown

    if not rows:
        raise SystemExit("no sweep rows to render")
    out = _out(args)
    ensembles = [r.model for r in rows if r.kind == "ensemble" and ":" not in r.model]
    targets = [r.model for r in rows if ":" in r.model]  # a model measured as it is, e.g. default:2xw2@48px
    target = targets[0] if targets else ("2xw2" if "2xw2" in ensembles else (ensembles or ["2xw2"])[0])
    measured = None
    if what is None:  # re-rendered: say what the CSV was measured on
        loads = [r.load_average_1m for r in rows if r.load_average_1m is not None]
        first = rows[0]
        measured = (
            f"Measured on {first.cpu}, {first.cores} cores, onnxruntime {first.onnxruntime}, from "
            f"{min(r.measured_at for r in rows)} to {max(r.measured_at for r in rows)}, 1-minute load average "
            f"{min(loads, default=float('nan')):.2f}-{max(loads, default=float('nan')):.2f}; re-rendered from its CSV "
            f"by `python -m bench {shlex.join(argv)}`."
        )
        what = f"Sweep models trained {first.training_steps} steps at {first.image_size}x{first.image_size}."
        csv_path = args.from_csv
    what += (
        f" Targets checked on `{target}`. Latencies are the median over rounds of each round's p50 (p95), in ms; "
        "ratios are the mean of the rounds' ratios with its 95 % t-interval. Compare only ratios measured in one run. "
        "The chart plots each model's fused-default latency (a single model: its one session) and, for an "
        f"ensemble, its separate-default latency too; the data is [{SWEEP_CSV}]({SWEEP_CSV})."
    )
    charted = [r for r in rows if ":" not in r.model]  # not the targets model: another resolution
    chart = plot_sweep(charted, out / "sweep.png", f"{rows[0].cpu}, {rows[0].cores} cores, {rows[0].measured_at}")
    if csv_path:
        _copy(csv_path, out, SWEEP_CSV)
    text = sweep_markdown(rows, what, target)
    lines = sweep_lines(rows, target)
    _publish(args, argv, out, text, [], figure=chart, lines=lines, measured=measured, data=out / SWEEP_CSV)


def scale(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.report import plot_scale, scale_lines, scale_markdown
    from bench.sweep import SCALE_STEPS, run_scale

    budget, rounds, out = _budget(args), _rounds(args), _out(args)
    sizes = args.sizes or _pick(args, SCALE_SIZES)
    target_ms = args.target_ms or PUBLISHED_SEPARATE_MS
    probe = Budget(SCALE_PROBE.warmup, args.runs or SCALE_PROBE.runs, SCALE_PROBE.max_seconds)
    published, rows = run_scale(sizes, target_ms, _pick(args, SCALE_LARGEST), budget, probe, rounds, out / "models")
    what = (
        f"Two width-2 members ({SCALE_STEPS} training steps: latency does not depend on the weights) exported and "
        f"fused by model_build at each size; **{published}px** is where the pair as separate sessions in a loop "
        f"with default options took nearest {target_ms:g} ms (the published loop's cost) when probed. Per size, "
        "each side of each layout in a process of its own, timed in "
        f"{rounds} interleaved rounds (the order rotated each round): per round {budget.warmup} warm-up runs, then "
        f"{budget.runs} timed runs (at most {budget.max_seconds:g} s), batch 1. Latencies are the median of the "
        "rounds' medians; ratios and differences the mean of the rounds' with its 95 % t-interval. Both sides of a "
        "row use the same session options."
    )
    chart = plot_scale(rows, published, out / "scale.png", Machine.current().describe())
    text = scale_markdown(rows, what, published)
    _publish(args, argv, out, text, [], results=rows, figure=chart, lines=scale_lines(rows, published))


def load(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.load import LoadPlan, run
    from bench.report import load_checks, load_markdown, overload_lines

    budget, out = _budget(args), _out(args)
    plan = LoadPlan(
        concurrencies=(1, 2, 4, 8),
        requests=args.requests or _pick(args, LOAD_REQUESTS),
        max_s=_pick(args, LOAD_MAX_S),
        warmup=budget.warmup,
        floor=budget,
        overload_rounds=args.overload_rounds or _pick(args, OVERLOAD_ROUNDS),
        overload_s=args.overload_seconds or _pick(args, OVERLOAD_SECONDS),
    )
    report = run(args.url, args.model_dir, plan, args.rate, out)
    lines = overload_lines(report)
    _publish(args, argv, out, load_markdown(report), load_checks(report), results=report, lines=lines)


def interference(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.interference import run
    from bench.report import interference_checks, interference_markdown

    budget, out = _budget(args), _out(args)
    rows = run(args.model_dir, budget)
    text = interference_markdown(rows, args.model_dir, budget)
    _publish(args, argv, out, text, interference_checks(rows), results=rows)


def quant(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.quant import run
    from bench.report import quant_checks, quant_markdown

    budget, out = _budget(args), _out(args)
    calibration = args.calibration_images or _pick(args, QUANT_CALIBRATION_IMAGES)
    variants = run(args.model_dir, out, budget, calibration, args.test_images)
    text = quant_markdown(variants, args.model_dir, budget, calibration)
    _publish(args, argv, out, text, quant_checks(variants), results=variants)


def compare(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.compare import run

    print(run(args.model_dir, args.rounds, args.calls, args.requests))


def layouts(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.layouts import run

    print(run(args.model_dir, args.rounds, args.seconds, args.clients, args.auto_budget_s))


def peers(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.peers import run

    print(run(args.model_dir, args.kserve_python, args.rounds, args.seconds))


COMMANDS = {
    "sweep": sweep,
    "scale": scale,
    "load": load,
    "interference": interference,
    "quant": quant,
    "compare": compare,
    "layouts": layouts,
    "peers": peers,
}


Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it


def _add(commands: Subparsers, name: str, summary: str, module: str | None = None) -> argparse.ArgumentParser:
    """A command, described by its experiment's module (named after it unless given): `--help` prints the module's
    docstring."""
    description = importlib.import_module(f"bench.{module or name}").__doc__
    return commands.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def _add_common(p: argparse.ArgumentParser, command: str, quick: str) -> None:
    full_budget, quick_budget = BUDGETS[command]
    p.add_argument("--quick", action="store_true", help=f"smoke-test form, seconds not minutes: {quick}")
    p.add_argument("--out", type=Path, help=f"results directory (default {ARTIFACTS}/{command}[-quick])")
    p.add_argument(
        "--docs", type=Path, help=f"markdown file whose section to rewrite (default {DOCS}; none if --quick)"
    )
    p.add_argument("--no-docs", action="store_true", help="rewrite no markdown file, even on a full run")
    p.add_argument(
        "--runs", type=int, help=f"timed runs per configuration (default {full_budget.runs}, quick {quick_budget.runs})"
    )


def _add_model_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help=f"the model to measure (default {DEFAULT_MODEL_DIR})",
    )


def _add_sweep(commands: Subparsers) -> None:
    widths, ensembles = SWEEP_WIDTHS[0], SWEEP_ENSEMBLES[0]
    p = _add(
        commands, "sweep", "build single models and ensembles, time every way to run each, chart latency vs accuracy"
    )
    _add_common(p, "sweep", "widths 2 3, ensembles 2xw2 w2+w3, the test preset's training")
    p.add_argument("--widths", type=int, nargs="+", help=f"single-model widths (default {' '.join(map(str, widths))})")
    p.add_argument(
        "--ensembles", nargs="*", help=f"labels like 2xw2 w2+w3, none if empty (default {' '.join(ensembles)})"
    )
    p.add_argument("--steps", type=int, help=f"training steps per member (default {SWEEP_STEPS})")
    p.add_argument("--image-size", type=int, help=f"training and inference resolution (default {SWEEP_IMAGE_SIZE})")
    p.add_argument("--test-images", type=int, help=f"held-out images for accuracy (default {SWEEP_TEST_IMAGES})")
    p.add_argument(
        "--targets-model-dir",
        type=Path,
        help=f"a built model measured as it is, on which the targets are checked (default {DEFAULT_MODEL_DIR} "
        "when it exists; none if --quick); else the sweep's 2xw2",
    )
    p.add_argument(
        "--reuse-members",
        type=Path,
        action="append",
        default=[],
        metavar="MODEL_DIR",
        help="copy member files from this model directory (the build keeps them if their fingerprint matches)",
    )
    p.add_argument("--resume", action="store_true", help="keep the configurations the CSV under --out already has")
    p.add_argument(
        "--threads",
        type=int,
        help="training threads per member (default: every core; on a machine shared with other work, 1: two "
        "threads that wait for each other on cores they do not get trained 10x slower here)",
    )
    p.add_argument("--rounds", type=int, help=f"interleaved timing rounds (default {ROUNDS['sweep'][0]})")
    p.add_argument(
        "--from-csv",
        type=Path,
        metavar="CSV",
        help=f"no build or timing: re-render the table, chart and docs section from a run's CSV (docs/{SWEEP_CSV})",
    )


def _add_scale(commands: Subparsers) -> None:
    summary = "a width-2 pair across input sizes: separate ÷ fused per thread and spinning layout"
    p = _add(commands, "scale", summary, module="sweep")
    _add_common(p, "scale", f"size {SCALE_SIZES[1][0]} only (no search beyond it), 2 rounds")
    p.add_argument("--sizes", type=int, nargs="+", help=f"input sizes, multiples of 16 (default {SCALE_SIZES[0]})")
    p.add_argument(
        "--target-ms",
        type=float,
        help="also measure the size where the pair in a loop costs this "
        f"(default {PUBLISHED_SEPARATE_MS:g}, published)",
    )
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {ROUNDS['scale'][0]})")


def _add_load(commands: Subparsers) -> None:
    p = _add(commands, "load", "HTTP load on the service and on a naive server, next to the in-process floor; overload")
    _add_common(p, "load", "a dozen requests per load point, 2 overload rounds of 1 s windows")
    _add_model_dir(p)
    p.add_argument("--url", help="a running service on loopback serving --model-dir (default: start `python -m app`)")
    p.add_argument("--rate", type=float, help="open-loop requests/s (default: a quarter of the slowest mode's floor)")
    p.add_argument(
        "--requests",
        type=int,
        help=f"requests per load point (default {LOAD_REQUESTS[0]}, quick {LOAD_REQUESTS[1]})",
    )
    p.add_argument(
        "--overload-rounds",
        type=int,
        help=f"overload rounds (default {OVERLOAD_ROUNDS[0]}, quick {OVERLOAD_ROUNDS[1]})",
    )
    p.add_argument(
        "--overload-seconds",
        type=float,
        help=f"each window of an overload round (default {OVERLOAD_SECONDS[0]:g}, quick {OVERLOAD_SECONDS[1]:g})",
    )


def _add_interference(commands: Subparsers) -> None:
    p = _add(commands, "interference", "each service mode alone vs interleaved with the other modes")
    _add_common(p, "interference", "a few runs per configuration")
    _add_model_dir(p)


def _add_quant(commands: Subparsers) -> None:
    p = _add(commands, "quant", "int8 fused graphs: held-out accuracy and latency next to fp32")
    _add_common(p, "quant", "a few runs, 16 calibration images")
    _add_model_dir(p)
    p.add_argument(
        "--calibration-images",
        type=int,
        help=f"static quantisation's calibration images (default {QUANT_CALIBRATION_IMAGES[0]})",
    )
    p.add_argument("--test-images", type=int, help="held-out images (default: as many as the manifest's metrics)")


def _add_interleaved(
    commands: Subparsers, name: str, summary: str, rounds: int, seconds: bool
) -> argparse.ArgumentParser:
    """A command of interleaved rounds on one model directory (compare, layouts, peers)."""
    p = _add(commands, name, summary)
    _add_model_dir(p)
    p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    if seconds:
        p.add_argument("--seconds", type=float, default=5, help="length of each hey run (default 5)")
    return p


def _add_compare(commands: Subparsers) -> None:
    summary = "fused or separate, for any model directory: every mode timed in-process and over /v2"
    p = _add_interleaved(commands, "compare", summary, rounds=5, seconds=False)
    p.add_argument("--calls", type=int, default=30, help="in-process calls a mode a round (default 30)")
    p.add_argument("--requests", type=int, default=40, help="HTTP requests a mode a round (default 40)")


def _add_layouts(commands: Subparsers) -> None:
    summary = "today's layout (one slot) against the one auto picks, and goodput under overload, over HTTP"
    p = _add_interleaved(commands, "layouts", summary, rounds=3, seconds=True)
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients for saturation (default 4)")
    p.add_argument("--auto-budget-s", type=float, default=20, help="the auto server's AUTO_BUDGET_S (default 20)")


def _add_peers(commands: Subparsers) -> None:
    summary = "this service against KServe's Python model server and the naive server on the same graph"
    p = _add_interleaved(commands, "peers", summary, rounds=3, seconds=True)
    p.add_argument(
        "--kserve-python", type=Path, default=Path(".venv-kserve/bin/python"), help="made by `make kserve-venv`"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = p.add_subparsers(
        dest="command", required=True, metavar="{sweep,scale,load,interference,quant,compare,layouts,peers}"
    )
    _add_sweep(commands)
    _add_scale(commands)
    _add_load(commands)
    _add_interference(commands)
    _add_quant(commands)
    _add_compare(commands)
    _add_layouts(commands)
    _add_peers(commands)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    COMMANDS[args.command](args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
