"""`python -m bench sweep|scale|compare|layouts|batching|peers|workers ...`, from the repository root; `--help` on each.

Every command prints its report (markdown) and writes it under --out; `--quick` runs take seconds and exist for the
smoke tests. Full runs of sweep and scale also rewrite their own section of docs/benchmarks.md (and copy their chart
and data next to it) unless --no-docs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from app.engine.resources import usable_cores
from bench import batching, compare, layouts, peers, scale, sweep, workers
from bench.common import Budget, Machine, Report, update_section
from ensemble_contract.modes import Mode
from model_build.config import PRESETS, TrainingConfig

DOCS = Path("docs/benchmarks.md")
ARTIFACTS = Path("artifacts/bench")
DEFAULT_MODEL_DIR = Path("models/default")
SECTIONS = ("sweep", "scale")  # the commands whose full runs rewrite their section of the docs
# (full, --quick) per command: interleaved rounds, and the length of each `hey` run
ROUNDS = {
    "sweep": (5, 2),
    "scale": (6, 2),
    "compare": (5, 2),
    "layouts": (3, 2),
    "batching": (5, 2),
    "peers": (5, 2),
    "workers": (5, 2),
}
SECONDS = {"compare": (1.0, 0.3), "layouts": (5.0, 0.3), "batching": (3.0, 0.3), "peers": (5.0, 0.3)}
SECONDS["workers"] = SECONDS["peers"]
T = TypeVar("T")


def _pick(args: argparse.Namespace, full: T, quick: T) -> T:
    return quick if args.quick else full


def _rounds(args: argparse.Namespace) -> int:
    return int(args.rounds or _pick(args, *ROUNDS[args.command]))


def _seconds(args: argparse.Namespace) -> float:
    return float(args.seconds or _pick(args, *SECONDS[args.command]))


def _budget(args: argparse.Namespace, full: Budget, quick: Budget) -> Budget:
    budget = _pick(args, full, quick)
    return Budget(budget.warmup, args.runs or budget.runs, budget.max_seconds)


def sweep_command(args: argparse.Namespace, out: Path) -> Report:
    if args.from_csv:
        return sweep.rerender(args.from_csv, out)
    if args.quick:  # the test preset's training, so that its members can be reused
        training, test_images = PRESETS["test"].training, PRESETS["test"].test_images
    else:
        training = TrainingConfig(image_size=32, batch_size=16, steps=400, threads=usable_cores().count)
        test_images = 500
    changes = {"steps": args.steps, "image_size": args.image_size, "threads": args.threads}
    training = training.model_copy(update={k: v for k, v in changes.items() if v is not None})
    widths = args.widths or _pick(args, sweep.WIDTHS, (2, 3))
    labels = args.ensembles if args.ensembles is not None else _pick(args, sweep.ENSEMBLES, ("2xw2", "w2+w3"))
    specs = [sweep.single(w) for w in widths] + [sweep.ensemble(label) for label in labels]
    budget = _budget(args, Budget(10, 60, 12), Budget(3, 20, 5))
    return sweep.run(specs, training, args.test_images or test_images, args.reuse_members, budget, _rounds(args), out)


def scale_command(args: argparse.Namespace, out: Path) -> Report:
    sizes = args.sizes or _pick(args, (48, 96, 192, 384), (32,))
    probe = Budget(2, args.runs or 10, 5)
    budget = _budget(args, Budget(3, 30, 2), Budget(1, 5, 1))
    largest = _pick(args, scale.MAX_SIZE, max(sizes))  # quick: no size beyond its own, so no other build
    return scale.run(sizes, args.target_ms, largest, budget, probe, _rounds(args), out)


def compare_command(args: argparse.Namespace, out: Path) -> Report:
    budget = Budget(3, args.calls or _pick(args, 30, 5), 10)
    return compare.run(args.model_dir, budget, _rounds(args), _seconds(args), out)


def layouts_command(args: argparse.Namespace, out: Path) -> Report:
    return layouts.run(args.model_dir, args.slots, args.clients, _rounds(args), _seconds(args), out)


def batching_command(args: argparse.Namespace, out: Path) -> Report:
    return batching.run(args.model_dir, args.modes, args.rows, _rounds(args), _seconds(args), out)


def workers_command(args: argparse.Namespace, out: Path) -> Report:
    return workers.run(args.model_dir, _rounds(args), _seconds(args), out)


def peers_command(args: argparse.Namespace, out: Path) -> Report:
    return peers.run(args.model_dir, args.kserve_python, args.triton_python, _rounds(args), _seconds(args), out)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, Path], Report], str]] = {
    "sweep": (sweep_command, "build single models and ensembles, time separate vs fused, chart latency vs accuracy"),
    "scale": (scale_command, "a width-2 pair across input sizes: separate ÷ fused per thread and spinning layout"),
    "compare": (compare_command, "fused or separate, for any model directory: every mode in-process and over /v2"),
    "layouts": (layouts_command, "the service under each INFERENCE_SLOTS layout, through HTTP"),
    "batching": (batching_command, "batched against unbatched throughput in-process, and what reaches HTTP clients"),
    "peers": (peers_command, "this service against Triton, KServe's Python model server and a naive server"),
    "workers": (workers_command, "one worker process against one per core, and 1 core against 2, through HTTP"),
}


def publish(args: argparse.Namespace, argv: Sequence[str], out: Path, report: Report) -> None:
    """Writes OUT/<command>.md (the report after what and how it was measured) and prints it; rewrites the command's
    section of the docs when asked, with copies of its chart and data next to them (artifacts/ is not committed)."""
    command = f"`python -m bench {shlex.join(argv)}`"
    if report.measured_on:
        measured = f"Measured on {report.measured_on}; re-rendered from its CSV by {command}."
    else:
        measured = f"Measured on {Machine.current().describe()} by {command}."
    text = f"{measured} {report.text}" + (f"\n\n![{args.command}]({report.figure.name})" if report.figure else "")
    (out / f"{args.command}.md").write_text(text + "\n")
    print(text)
    docs = None if args.command not in SECTIONS or args.no_docs else args.docs or _pick(args, DOCS, None)
    if docs:
        for file in (f for f in (report.figure, report.data) if f):
            if file.resolve() != (docs.parent / file.name).resolve():
                shutil.copyfile(file, docs.parent / file.name)
        update_section(docs, args.command, text)


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--quick", action="store_true", help="the smoke tests' form: seconds, not minutes")
    p.add_argument("--out", type=Path, help=f"results directory (default {ARTIFACTS}/{command}[-quick])")
    full, quick = ROUNDS[command]
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {full}, quick {quick})")
    if command in SECTIONS:
        p.add_argument("--runs", type=int, help="timed runs per configuration and round")
        p.add_argument(
            "--docs", type=Path, help=f"markdown file whose section to rewrite (default {DOCS}, not --quick)"
        )
        p.add_argument("--no-docs", action="store_true", help="rewrite no markdown file, even on a full run")
    else:
        p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help=f"default {DEFAULT_MODEL_DIR}")
        full_s, quick_s = SECONDS[command]
        p.add_argument("--seconds", type=float, help=f"each `hey` run (default {full_s:g} s, quick {quick_s:g} s)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    sub = {}
    for name, (_, summary) in COMMANDS.items():
        description = sys.modules[f"bench.{name}"].__doc__
        sub[name] = commands.add_parser(
            name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        _add_common(sub[name], name)
    s = sub["sweep"]
    s.add_argument("--widths", type=int, nargs="+", help="single-model widths (default 2 3 4 5 6 7)")
    s.add_argument(
        "--ensembles", nargs="*", help=f"labels like 2xw2 w2+w3, none if empty (default {' '.join(sweep.ENSEMBLES)})"
    )
    s.add_argument("--steps", type=int, help="training steps per member (default 400)")
    s.add_argument("--image-size", type=int, help="training and inference resolution (default 32)")
    s.add_argument("--test-images", type=int, help="held-out images for accuracy (default 500)")
    s.add_argument("--threads", type=int, help="training threads per member (default: every core; shared machine: 1)")
    s.add_argument(
        "--reuse-members", type=Path, action="append", default=[], metavar="MODEL_DIR", help="copy matching members"
    )
    s.add_argument("--from-csv", type=Path, metavar="CSV", help="no build or timing: re-render a run's CSV")
    s = sub["scale"]
    s.add_argument("--sizes", type=int, nargs="+", help="input sizes, multiples of 16 (default 48 96 192 384)")
    s.add_argument(
        "--target-ms", type=float, default=scale.PUBLISHED_SEPARATE_MS, help="also measure where the loop costs this"
    )
    sub["compare"].add_argument("--calls", type=int, help="in-process calls a mode a round (default 30)")
    slots, kserve, triton = (
        sorted({1, usable_cores().count}),
        Path(".venv-kserve/bin/python"),
        Path(".venv-triton/bin/python"),
    )
    sub["layouts"].add_argument(
        "--slots", type=int, nargs="+", default=slots, help="INFERENCE_SLOTS (default 1, cores)"
    )
    sub["layouts"].add_argument("--clients", type=int, nargs="+", default=[4, 32], help="hey's clients (default 4 32)")
    sub["peers"].add_argument("--kserve-python", type=Path, default=kserve, help=f"from `make kserve-venv`: {kserve}")
    sub["peers"].add_argument("--triton-python", type=Path, default=triton, help=f"from `make triton-venv`: {triton}")
    sub["batching"].add_argument("--modes", type=Mode, nargs="+", help="default: every mode the model serves")
    sub["batching"].add_argument("--rows", type=int, default=8, help="the most rows a batch merges (default 8)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    out: Path = args.out or ARTIFACTS / (args.command + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    publish(args, argv, out, COMMANDS[args.command][0](args, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
