"""`python -m bench COMMAND ...`, from the repository root; `--help` on each.

Every command prints its report (markdown) and writes it under --out; `--quick` runs take seconds and exist for the
smoke tests. A full sweep also rewrites its section of docs/benchmarks.md (and copies its chart and data next to it)
unless --no-docs.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from app.engine.resources import usable_cores
from bench import batching, compare, frontend, peers, sweep, workers
from bench.common import Budget, Machine, Report, update_section
from ensemble_contract.modes import Mode
from model_build.config import PRESETS, TrainingConfig
from model_build.folder import read_folder

DOCS = Path("docs/benchmarks.md")
ARTIFACTS = Path("artifacts/bench")
DEFAULT_MODEL_DIR = Path("models/default")
Runner = Callable[[argparse.Namespace, Path], Report]


class Command(NamedTuple):
    """A subcommand: what runs it, and the length of each `hey` run (full, --quick; None for the in-process
    experiments, whose full runs rewrite their section of the docs). Its --help is its module's."""

    run: Runner
    seconds: tuple[float, float] | None = None
    model_dir: Path | None = DEFAULT_MODEL_DIR  # --model-dir's default, None: the command builds its own model


def run_sweep(args: argparse.Namespace, out: Path) -> Report:
    if args.from_csv:
        return sweep.rerender(args.from_csv, out)
    if args.quick:  # the test preset's training, so that its members can be reused
        training, test_images = PRESETS["test"].training, PRESETS["test"].test_images
    else:
        training = TrainingConfig(image_size=32, batch_size=16, steps=400, threads=usable_cores().count)
        test_images = 500
    changes = {"steps": args.steps, "image_size": args.image_size, "threads": args.threads}
    training = training.model_copy(update={k: v for k, v in changes.items() if v is not None})
    widths = args.widths or ((2, 3) if args.quick else sweep.WIDTHS)
    labels = args.ensembles if args.ensembles is not None else ("2xw2", "w2+w3") if args.quick else sweep.ENSEMBLES
    specs = [sweep.single(w) for w in widths] + [sweep.ensemble(label) for label in labels]
    chosen = Budget(3, 20, 5) if args.quick else Budget(10, 60, 12)
    timing = Budget(chosen.warmup, args.runs or chosen.runs, chosen.max_seconds)
    folder = read_folder(args.data) if args.data else None
    test_images = max(1, len(folder.indices("test"))) if folder else args.test_images or test_images
    return sweep.run(specs, sweep.Training(training, test_images, folder), args.reuse_members, timing, args.rounds, out)


ROUNDS = (5, 2)  # interleaved rounds: full, --quick
COMMANDS: dict[str, Command] = {
    "sweep": Command(run_sweep),
    "compare": Command(lambda a, out: compare.run(a.model_dir, a.calls or (5 if a.quick else 30), a.rounds,
                                                  a.seconds, out), (1.0, 0.3)),
    "batching": Command(lambda a, out: batching.run(a.model_dir, a.modes, a.rows, a.rounds, a.seconds, out),
                        (3.0, 0.3)),
    "peers": Command(lambda a, out: peers.run(a.model_dir, {n: getattr(a, f"{n}_python") for n in peers.ENVIRONMENTS},
                                              a.rounds, a.seconds, out), (5.0, 0.3)),
    "workers": Command(lambda a, out: workers.run(a.model_dir, a.rounds, a.seconds, out), (5.0, 0.3)),
    "frontend": Command(lambda a, out: frontend.run(a.model_dir, a.triton_python, a.rounds, a.seconds, out),
                        (5.0, 0.3), model_dir=None),
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=raw)
    subparsers = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    sub = {}
    for name, command in COMMANDS.items():
        doc = sys.modules[f"bench.{name}"].__doc__ or ""
        summary = doc.split(": ", 1)[1].split("\n")[0]  # the docstring's first line: "`python -m bench x`: summary"
        sub[name] = s = subparsers.add_parser(name, help=summary, description=doc, formatter_class=raw)
        s.add_argument("--quick", action="store_true", help="the smoke tests' form: seconds, not minutes")
        s.add_argument("--out", type=Path, help=f"results directory (default {ARTIFACTS}/{name}[-quick])")
        s.add_argument("--rounds", type=int, help="interleaved rounds (default {}, quick {})".format(*ROUNDS))
        if command.seconds is None:
            s.add_argument("--runs", type=int, help="timed runs per configuration and round")
            s.add_argument("--docs", type=Path, help=f"file whose section to rewrite (default {DOCS}, not --quick)")
            s.add_argument("--no-docs", action="store_true", help="rewrite no markdown file, even on a full run")
        else:
            default = command.model_dir or "a trivial ensemble it builds (bench.trivial)"
            s.add_argument("--model-dir", type=Path, default=command.model_dir, help=f"default {default}")
            s.add_argument("--seconds", type=float, help="each `hey` run (default {:g} s, quick {:g} s)".format(
                *command.seconds))  # fmt: skip
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
    s.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="your labelled images (docs/build.md), not the shapes; no docs rewritten",
    )
    sub["compare"].add_argument("--calls", type=int, help="in-process calls a mode a round (default 30)")
    for name, python in ((n, Path(f".venv-{n}/bin/python")) for n in peers.ENVIRONMENTS):
        takers = [sub["peers"], sub["frontend"]] if name == "triton" else [sub["peers"]]
        for s in takers:
            s.add_argument(f"--{name}-python", type=Path, default=python, help=f"from `make {name}-venv`: {python}")
    sub["batching"].add_argument("--modes", type=Mode, nargs="+", help="default: every mode the model serves")
    sub["batching"].add_argument("--rows", type=int, default=8, help="the most rows a batch merges (default 8)")
    return p


def publish(args: argparse.Namespace, argv: Sequence[str], out: Path, report: Report) -> None:
    """Writes OUT/<command>.md (the report after what and how it was measured) and prints it; a full run of an
    in-process experiment also rewrites its section of the docs, with copies of its chart and data next to them
    (artifacts/ is not committed)."""
    command = f"`python -m bench {shlex.join(argv)}`"
    if report.measured_on:
        measured = f"Measured on {report.measured_on}; re-rendered from its CSV by {command}."
    else:
        measured = f"Measured on {Machine.current().describe()} by {command}."
    text = f"{measured} {report.text}" + (f"\n\n![{args.command}]({report.figure.name})" if report.figure else "")
    (out / f"{args.command}.md").write_text(text + "\n")
    print(text)
    in_process = COMMANDS[args.command].seconds is None
    docs = args.docs or (None if args.quick else DOCS) if in_process and not args.no_docs else None
    if docs:
        for file in (f for f in (report.figure, report.data) if f):
            if file.resolve() != (docs.parent / file.name).resolve():
                shutil.copyfile(file, docs.parent / file.name)
        update_section(docs, args.command, text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    command = COMMANDS[args.command]
    args.rounds = args.rounds or ROUNDS[args.quick]
    if command.seconds is not None:
        args.seconds = args.seconds or command.seconds[args.quick]
    if getattr(args, "data", None) is not None:
        args.no_docs = True  # the published section is the shapes' experiment; yours stays in --out
    out: Path = args.out or ARTIFACTS / (args.command + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    publish(args, argv, out, command.run(args, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
