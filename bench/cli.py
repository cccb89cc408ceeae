"""Command line: `python -m bench sweep|load|interference|quant|compare|layouts|peers ...`; `--help` on each command.

Full runs take minutes and rewrite their own section of docs/benchmarks.md; `--quick` runs take seconds,
write only under --out, and exist for the smoke tests. Run from the repository root.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import commands as c
from bench import compare, layouts, peers

Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it


def _add_common(p: argparse.ArgumentParser, command: str, quick: str) -> None:
    full_budget, quick_budget = c.BUDGETS[command]
    p.add_argument("--quick", action="store_true", help=f"smoke-test form, seconds not minutes: {quick}")
    p.add_argument("--out", type=Path, help=f"results directory (default {c.ARTIFACTS}/{command}[-quick])")
    p.add_argument(
        "--docs", type=Path, help=f"markdown file whose section to rewrite (default {c.DOCS}; none if --quick)"
    )
    p.add_argument("--no-docs", action="store_true", help="rewrite no markdown file, even on a full run")
    p.add_argument(
        "--runs", type=int, help=f"timed runs per configuration (default {full_budget.runs}, quick {quick_budget.runs})"
    )


def _add_model_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir",
        type=Path,
        default=c.DEFAULT_MODEL_DIR,
        help=f"the model to measure (default {c.DEFAULT_MODEL_DIR})",
    )


def _add_sweep(commands: Subparsers) -> None:
    widths, ensembles = c.SWEEP_WIDTHS[0], c.SWEEP_ENSEMBLES[0]
    p = commands.add_parser(
        "sweep",
        help="build single models and ensembles, time every way to run each, chart latency vs accuracy",
        description="Builds single UNets and ensembles of them (reusing what an earlier run built under --out), "
        "then times each model in each configuration (separate sessions in a loop with default or tuned "
        "options, in parallel threads, fused), each in its own process. Writes sweep.csv, sweep.png, sweep.md; "
        "a full run also docs/sweep.png and its section of docs/benchmarks.md. About 20 min on 2 cores.",
    )
    _add_common(p, "sweep", "widths 2 3, ensembles 2xw2 w2+w3, the test preset's training")
    p.add_argument("--widths", type=int, nargs="+", help=f"single-model widths (default {' '.join(map(str, widths))})")
    p.add_argument(
        "--ensembles", nargs="*", help=f"labels like 2xw2 w2+w3, none if empty (default {' '.join(ensembles)})"
    )
    p.add_argument("--steps", type=int, help=f"training steps per member (default {c.SWEEP_STEPS})")
    p.add_argument("--image-size", type=int, help=f"training and inference resolution (default {c.SWEEP_IMAGE_SIZE})")
    p.add_argument("--test-images", type=int, help=f"held-out images for accuracy (default {c.SWEEP_TEST_IMAGES})")
    p.add_argument(
        "--targets-model-dir",
        type=Path,
        help=f"a built model measured as it is, on which the targets are checked (default {c.DEFAULT_MODEL_DIR} "
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


def _add_load(commands: Subparsers) -> None:
    p = commands.add_parser(
        "load",
        help="HTTP load on the service and on a naive server, next to the in-process floor",
        description="Times each service mode in-process (the floor), then drives the naive baseline server "
        "(bench.baseline_server) and the service with closed loops at concurrency 1, 2, 4, 8 and an open loop "
        "at a fixed rate, per mode and in `compare`. Starts both servers itself on free loopback ports unless "
        "--url names a running service. About 5 min on 2 cores.",
    )
    _add_common(p, "load", "a dozen requests per load point")
    _add_model_dir(p)
    p.add_argument("--url", help="a running service on loopback serving --model-dir (default: start `python -m app`)")
    p.add_argument("--rate", type=float, help="open-loop requests/s (default: a quarter of the slowest mode's floor)")
    p.add_argument(
        "--requests",
        type=int,
        help=f"requests per load point (default {c.LOAD_REQUESTS[0]}, quick {c.LOAD_REQUESTS[1]})",
    )


def _add_interference(commands: Subparsers) -> None:
    p = commands.add_parser(
        "interference",
        help="each service mode alone vs interleaved with the other modes",
        description="Runs the service's runtime in-process, with the service's settings and with spinning "
        "flipped: each mode alone, then all the modes served interleaved, each in its own process. "
        "About 4 min on 2 cores.",
    )
    _add_common(p, "interference", "a few runs per configuration")
    _add_model_dir(p)


def _add_quant(commands: Subparsers) -> None:
    p = commands.add_parser(
        "quant",
        help="int8 fused graphs: held-out accuracy and latency next to fp32",
        description="Quantises the fused graph with onnxruntime.quantization (dynamic, and static QDQ calibrated "
        "on training-seed images), scores each on the held-out set and times each in its own process. "
        "About 2 min on 2 cores.",
    )
    _add_common(p, "quant", "a few runs, 16 calibration images")
    _add_model_dir(p)
    p.add_argument(
        "--calibration-images",
        type=int,
        help=f"static quantisation's calibration images (default {c.QUANT_CALIBRATION_IMAGES[0]})",
    )
    p.add_argument("--test-images", type=int, help="held-out images (default: as many as the manifest's metrics)")


def _add_interleaved(
    commands: Subparsers, name: str, summary: str, description: str | None, rounds: int, seconds: bool
) -> argparse.ArgumentParser:
    """A command of interleaved rounds on one model directory (compare, layouts, peers)."""
    p = commands.add_parser(name, help=summary, description=description)
    _add_model_dir(p)
    p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    if seconds:
        p.add_argument("--seconds", type=float, default=5, help="length of each hey run (default 5)")
    return p


def _add_compare(commands: Subparsers) -> None:
    summary = "fused or separate, for any model directory: every mode timed in-process and over /v2"
    p = _add_interleaved(commands, "compare", summary, compare.__doc__, rounds=5, seconds=False)
    p.add_argument("--calls", type=int, default=30, help="in-process calls a mode a round (default 30)")
    p.add_argument("--requests", type=int, default=40, help="HTTP requests a mode a round (default 40)")


def _add_layouts(commands: Subparsers) -> None:
    summary = "today's layout (one slot) against the one auto picks, and goodput under overload, over HTTP"
    p = _add_interleaved(commands, "layouts", summary, layouts.__doc__, rounds=3, seconds=True)
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients for saturation (default 4)")
    p.add_argument("--auto-budget-s", type=float, default=20, help="the auto server's AUTO_BUDGET_S (default 20)")


def _add_peers(commands: Subparsers) -> None:
    summary = "this service against KServe's Python model server and the naive server on the same graph"
    p = _add_interleaved(commands, "peers", summary, peers.__doc__, rounds=3, seconds=True)
    p.add_argument(
        "--kserve-python", type=Path, default=Path(".venv-kserve/bin/python"), help="made by `make kserve-venv`"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = p.add_subparsers(
        dest="command", required=True, metavar="{sweep,load,interference,quant,compare,layouts,peers}"
    )
    _add_sweep(commands)
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
    c.COMMANDS[args.command](args, argv)
    return 0
