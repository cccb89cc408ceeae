"""What each command does with its parsed arguments: run the measurement, write the results under --out,
rewrite its own section of docs/benchmarks.md (full runs only, unless --docs is given), print its targets."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from bench.machine import Machine
from bench.markdown import update_section
from bench.targets import Check
from bench.timing import Budget

DOCS = Path("docs/benchmarks.md")
ARTIFACTS = Path("artifacts/bench")
DEFAULT_MODEL_DIR = Path("models/default")

# (full, --quick) per command; --runs replaces the timed runs of either.
BUDGETS: dict[str, tuple[Budget, Budget]] = {
    "sweep": (Budget(30, 300, 60), Budget(3, 20, 5)),
    "load": (Budget(50, 1000, 30), Budget(3, 20, 5)),  # the in-process floor
    "interference": (Budget(50, 1000, 60), Budget(3, 20, 5)),
    "quant": (Budget(30, 300, 60), Budget(3, 20, 5)),
}
SWEEP_WIDTHS = ((2, 3, 4, 5, 6, 7), (2, 3))
SWEEP_ENSEMBLES = (("2xw2", "3xw2", "2xw3", "w2+w3", "w2+w7"), ("2xw2", "w2+w3"))
SWEEP_IMAGE_SIZE, SWEEP_STEPS, SWEEP_BATCH, SWEEP_TEST_IMAGES = 32, 400, 16, 500
LOAD_REQUESTS, LOAD_MAX_S = (1000, 12), (30.0, 10.0)  # per load point
QUANT_CALIBRATION_IMAGES = (200, 16)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


T = TypeVar("T")


def _pick(args: argparse.Namespace, pair: tuple[T, T]) -> T:
    return pair[1] if args.quick else pair[0]


def _budget(args: argparse.Namespace) -> Budget:
    full, quick = BUDGETS[args.command]
    budget = quick if args.quick else full
    return Budget(budget.warmup, args.runs or budget.runs, budget.max_seconds)


def _out(args: argparse.Namespace) -> Path:
    out: Path = args.out or ARTIFACTS / (args.command + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json_list(path: Path, rows: Sequence[BaseModel]) -> None:
    """A JSON array, one row per line."""
    path.write_text("[" + ",\n".join(row.model_dump_json() for row in rows) + "]\n")


def _header(argv: Sequence[str], what: str) -> str:
    command = "python -m bench " + shlex.join(argv)
    return f"Measured on {Machine.current().describe()} by `{command}`. {what}"


def _publish(
    args: argparse.Namespace, out: Path, text: str, checks: Sequence[Check], figure: Path | None = None
) -> None:
    """Writes OUT/<command>.md; rewrites the command's section of the docs (and copies the figure next to
    them, since artifacts/ is not committed) when asked; prints the targets."""
    name = args.command
    (out / f"{name}.md").write_text(text + (f"\n\n![{name}]({figure.name})" if figure else "") + "\n")
    docs = None if args.no_docs else args.docs or (None if args.quick else DOCS)
    if docs:
        if figure:
            docs.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(figure, docs.parent / figure.name)
            text += f"\n\n![{name}]({figure.name})"
        update_section(docs, name, text)
    for check in checks:
        log(f"[{name}] " + " | ".join(check.row()))
    log(f"[{name}] wrote {out}{f' and {docs}' if docs else ''}")


def sweep(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.chart import plot_sweep
    from bench.sweep import measure_all, read_rows
    from bench.sweep_report import checks, report
    from bench.zoo import build_all, ensemble, of_model_dir, single
    from model_build.config import PRESETS, TrainingConfig

    widths = args.widths or _pick(args, SWEEP_WIDTHS)
    labels = args.ensembles if args.ensembles is not None else _pick(args, SWEEP_ENSEMBLES)
    specs = [single(w) for w in widths] + [ensemble(label) for label in labels]
    if args.quick:  # like the test preset, so that its members can be reused
        base, test_images = PRESETS["test"].training, PRESETS["test"].test_images
    else:
        cores = len(os.sched_getaffinity(0))
        base = TrainingConfig(image_size=SWEEP_IMAGE_SIZE, batch_size=SWEEP_BATCH, steps=SWEEP_STEPS, threads=cores)
        test_images = SWEEP_TEST_IMAGES
    changes = {"steps": args.steps, "image_size": args.image_size}
    training = base.model_copy(update={k: v for k, v in changes.items() if v is not None})
    test_images = args.test_images or test_images
    budget, out = _budget(args), _out(args)
    log(f"[sweep] building {len(specs)} models into {out / 'models'} (up-to-date ones are skipped)")
    dirs = build_all(specs, training, test_images, out / "models", reuse_from=args.reuse_members)
    models = [(s, dirs[s.label]) for s in specs]
    targets_dir = args.targets_model_dir or (None if args.quick else DEFAULT_MODEL_DIR)
    target = "2xw2"
    if targets_dir and (targets_dir / "manifest.json").is_file():
        models.append((of_model_dir(targets_dir), targets_dir))
        target = models[-1][0].label
    elif targets_dir:
        log(f"[sweep] {targets_dir} has no manifest.json: the targets are checked on the sweep's own 2xw2")
    csv_path = out / "sweep.csv"
    rows = measure_all(models, budget, csv_path, read_rows(csv_path) if args.resume else [])
    header = _header(
        argv,
        f"Sweep models trained {training.steps} steps at {training.image_size}x{training.image_size}, batch "
        f"{training.batch_size}, on {training.threads} thread(s); accuracy on {test_images} held-out images. "
        f"Targets checked on `{target}`. Each configuration in its own process: {budget.warmup} warm-up runs, then "
        f"{budget.runs} timed runs (at most {budget.max_seconds:g} s), batch 1. Latencies are p50 (p95) in ms. "
        "Compare only ratios measured in one run.",
    )
    charted = [r for r in rows if r.model in dirs]  # not the targets model: another resolution
    chart = plot_sweep(charted, out / "sweep.png", Machine.current().describe())
    _publish(args, out, report(rows, header, target), checks(rows, target), figure=chart)


def load(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.load_report import checks, markdown
    from bench.online import LoadPlan, run

    budget, out = _budget(args), _out(args)
    plan = LoadPlan(
        concurrencies=(1, 2, 4, 8),
        requests=args.requests or _pick(args, LOAD_REQUESTS),
        max_s=_pick(args, LOAD_MAX_S),
        warmup=budget.warmup,
        floor=budget,
    )
    report = run(args.url, args.model_dir, plan, args.rate, out)
    (out / "load.json").write_text(report.model_dump_json(indent=2) + "\n")
    _publish(args, out, markdown(report, _header(argv, "")), checks(report))


def interference(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.interference import checks, markdown, run

    budget, out = _budget(args), _out(args)
    rows = run(args.model_dir, budget)
    _write_json_list(out / "interference.json", rows)
    modes = ", ".join(dict.fromkeys(row.mode for row in rows))
    header = _header(
        argv,
        f"Model {args.model_dir}; the service's runtime in-process (no HTTP), each configuration in its own "
        f"process: {budget.warmup} warm-up rounds, then {budget.runs} timed rounds (at most "
        f"{budget.max_seconds:g} s). Interleaved: {modes} in turn, one inference at a time, "
        "as `compare` traffic runs with one inference slot. Latencies are p50 (p95) in ms.",
    )
    _publish(args, out, markdown(rows, header), checks(rows))


def quant(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.quant import run
    from bench.quant_report import checks, markdown

    budget, out = _budget(args), _out(args)
    calibration = args.calibration_images or _pick(args, QUANT_CALIBRATION_IMAGES)
    variants = run(args.model_dir, out, budget, calibration, args.test_images)
    _write_json_list(out / "quant.json", variants)
    header = _header(
        argv,
        f"The fused graph of {args.model_dir}; accuracy on {variants[0].metrics.images} held-out images. Static: "
        f"QDQ, per-channel int8 weights, uint8 activations, calibrated on {calibration} training-seed images; "
        f"dynamic: uint8 weights. Each latency in its own process, {budget.runs} timed runs, batch 1, "
        "p50 (p95) in ms.",
    )
    _publish(args, out, markdown(variants, header), checks(variants))


def compare(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.compare import run

    print(run(args.model_dir, args.rounds, args.calls, args.requests, log))


def layouts(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.layouts import run

    print(run(args.model_dir, args.rounds, args.seconds, args.clients, args.auto_budget_s, log))


def peers(args: argparse.Namespace, argv: Sequence[str]) -> None:
    from bench.peers import run

    print(run(args.model_dir, args.kserve_python, args.rounds, args.seconds, log))


COMMANDS = {
    "sweep": sweep,
    "load": load,
    "interference": interference,
    "quant": quant,
    "compare": compare,
    "layouts": layouts,
    "peers": peers,
}
