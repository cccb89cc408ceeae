"""Command line of the build step: `python -m model_build build|fuse ...` (also `ensemble-build`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_build.build import build, fuse_files, log
from model_build.config import PRESETS
from model_build.fuse import FusionError
from model_build.verify import FusedMismatchError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model_build", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="train, export and fuse an ensemble from a preset")
    build_cmd.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="test: tiny, seconds (for the test suite); default: what the service serves",
    )
    build_cmd.add_argument("--out", type=Path, help="output directory (default: models/<preset>)")
    fuse_cmd = commands.add_parser("fuse", help="fuse ONNX members you bring into a servable model directory")
    fuse_cmd.add_argument("members", type=Path, nargs="+", metavar="MEMBER.onnx")
    fuse_cmd.add_argument("--out", type=Path, required=True, help="output directory")
    fuse_cmd.add_argument("--name", default="custom-ensemble", help="the ensemble's name in the manifest")
    fuse_cmd.add_argument(
        "--labels",
        type=lambda s: s.split(","),
        help="comma-separated label names, if the members do not carry them in their metadata",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            build(PRESETS[args.preset], args.out or Path("models") / args.preset)
        else:
            fuse_files(args.members, args.out, args.name, args.labels)
    except (FusionError, FusedMismatchError, FileNotFoundError) as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
