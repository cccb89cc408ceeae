"""Command line of the build step: `python -m model_build build|fuse ...` (also `ensemble-build`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ensemble_contract.combine import Rule
from ensemble_contract.manifest import ImageTask
from model_build.config import MAX_ACCURACY_LOSS, PRESETS, BuildConfig, FolderData
from model_build.directory import log
from model_build.folder import LabelledFolder, read_folder
from model_build.fuse import FusionError
from model_build.user_members import FuseRequest, fuse_files, labels_option
from model_build.verify import FusedMismatchError

EPILOG = """\
fuse: members must take the same inputs (names, element types, ranks; static dims equal). Outputs every member
has are combined: floating ones by mean (or weighted mean with --weights), integer ones (labels) by majority vote,
a tie going to the smallest label; each floating one is also given stacked as <output>_members [N, M, ...].
Give --task (and the image options) to serve POST /predict for image members; /v2 serves any signature.
"""


def _seed(value: str) -> int:
    seed = int(value)
    if seed < 0:
        raise argparse.ArgumentTypeError("a seed is 0 or more")
    return seed


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("give 1 or more")
    return number


def _positive_list(value: str) -> list[int]:
    return [_positive(part) for part in value.split(",")]


def _triple(value: str) -> tuple[float, float, float]:
    parts = tuple(float(v) for v in value.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three comma-separated numbers, one per channel (R,G,B)")
    return parts  # type: ignore[return-value]


def _size(value: str) -> tuple[int, int]:
    height, _, width = value.lower().partition("x")
    try:
        return int(height), int(width or height)
    except ValueError:
        raise argparse.ArgumentTypeError("give HEIGHTxWIDTH, e.g. 224x224") from None


def _rule(value: str) -> tuple[str, Rule]:
    output, _, rule = value.rpartition("=")
    try:
        return output, Rule(rule)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give OUTPUT=mean or OUTPUT=vote, got {value!r}") from None


def _scale(value: str) -> float:
    numerator, _, denominator = value.partition("/")
    return float(numerator) / float(denominator or 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_build",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="train, export and fuse an ensemble of our UNets from a preset")
    build_cmd.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="test: tiny, seconds (for the test suite); default: what the service serves",
    )
    build_cmd.add_argument("--out", type=Path, help="output directory (default: models/<preset or DIR name>)")
    build_cmd.add_argument(
        "--seed", type=_seed, help="the first member's seed, the next ones following (default: the preset's, 1, 2, ...)"
    )
    build_cmd.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="train on your labelled images (DIR/images, DIR/labels.csv, DIR/masks optional: docs/build.md) instead "
        "of the synthetic shapes; the preset gives what the options below leave",
    )
    build_cmd.add_argument("--name", help="the ensemble's name (default: the preset's, or DIR's name)")
    build_cmd.add_argument(
        "--widths", type=_positive_list, metavar="W1,W2,...", help="the members' width scales, one member each"
    )
    build_cmd.add_argument("--members", type=_positive, help="members of each width (default: the preset's ensemble)")
    build_cmd.add_argument("--image-size", type=_size, metavar="HxW", help="training and serving size, multiples of 16")
    build_cmd.add_argument("--steps", type=_positive, help="training steps of each member")
    build_cmd.add_argument(
        "--resume",
        action="store_true",
        help="continue members from the checkpoints an interrupted build of the same configuration left in OUT",
    )
    fuse_cmd = commands.add_parser(
        "fuse",
        help="fuse ONNX members you bring into a servable model directory",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fuse_cmd.add_argument("members", type=Path, nargs="+", metavar="MEMBER.onnx")
    fuse_cmd.add_argument("--out", type=Path, required=True, help="output directory")
    fuse_cmd.add_argument("--name", default="custom-ensemble", help="the ensemble's name in the manifest and /v2")
    fuse_cmd.add_argument(
        "--combine",
        type=_rule,
        action="append",
        default=[],
        metavar="OUTPUT=mean|vote",
        help="how to combine an output (default: mean for floating outputs, vote for integer ones)",
    )
    fuse_cmd.add_argument(
        "--weights",
        type=lambda s: [float(w) for w in s.split(",")],
        metavar="W1,W2,...",
        help="one positive weight per member, for the mean and the vote (default: equal)",
    )
    fuse_cmd.add_argument("--calibration", type=Path, metavar="INPUTS.npz", help="inputs by name: makes an int8 graph")
    fuse_cmd.add_argument(
        "--eval",
        dest="evaluation",
        type=Path,
        metavar="INPUTS.npz",
        help="inputs and expected outputs by name: the int8 graph is kept only if its accuracy on them drops by "
        f"at most --max-accuracy-loss (default {MAX_ACCURACY_LOSS})",
    )
    fuse_cmd.add_argument("--max-accuracy-loss", type=float, default=MAX_ACCURACY_LOSS)
    image = fuse_cmd.add_argument_group("image members (for POST /predict)")
    image.add_argument("--task", type=ImageTask, choices=list(ImageTask), help="what the members do with an image")
    image.add_argument("--image-input", help="the image input (default: the only one)")
    image.add_argument("--image-size", type=_size, metavar="HxW", help="resize to (default: the input's static size)")
    image.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")
    image.add_argument("--channel-order", choices=["RGB", "BGR"], default="RGB")
    image.add_argument("--scale", type=_scale, default=1 / 255, help="pixel multiplier before mean/std (default 1/255)")
    image.add_argument("--mean", type=_triple, default=(0.0, 0.0, 0.0), metavar="R,G,B")
    image.add_argument("--std", type=_triple, default=(1.0, 1.0, 1.0), metavar="R,G,B")
    image.add_argument("--labels", type=labels_option, default=(), help="label names: a,b,c or @FILE (one a line)")
    image.add_argument("--scores-output", help="the output with one score per label")
    image.add_argument("--scores", choices=["probabilities", "logits"], default="probabilities")
    image.add_argument("--mask-output", help="the output with per-pixel class scores [N, classes, H, W]")
    image.add_argument("--mask-classes", type=labels_option, default=(), help="mask class names, 0 first")
    return parser


def _image_options(args: argparse.Namespace) -> dict[str, object] | None:
    if args.task is None:
        return None
    options: dict[str, object] = {
        "task": args.task,
        "layout": args.layout,
        "channel_order": args.channel_order,
        "scale": args.scale,
        "mean": args.mean,
        "std": args.std,
        "labels": args.labels,
        "scores": args.scores,
        "mask_classes": args.mask_classes,
    }
    if args.image_input:
        options["input"] = args.image_input
    if args.image_size:
        options["height"], options["width"] = args.image_size
    if args.scores_output:
        options["scores_output"] = args.scores_output
    if args.mask_output:
        options["mask_output"] = args.mask_output
    return options


def _build_config(args: argparse.Namespace, folder: LabelledFolder | None) -> BuildConfig:
    """The preset, with what the command line changes."""
    preset = PRESETS[args.preset]
    config = preset.model_dump()
    training = config["training"]
    if args.widths or args.members:
        widths = [width for width in args.widths or [2] for _ in range(args.members or 1)]
        config["members"] = [{"width_scale": width, "seed": i + 1} for i, width in enumerate(widths)]
    if args.image_size:
        if folder is None and args.image_size[0] != args.image_size[1]:
            raise ValueError("the synthetic shapes are square: give --image-size N")
        training["image_size"], training["image_width"] = args.image_size
    if args.steps:
        training["steps"] = args.steps
    if folder is not None:
        config["name"] = folder.root.name
        config["data"] = FolderData.of(folder).model_dump()
        config["test_images"] = max(1, len(folder.indices("test")))
    if args.name:
        config["name"] = args.name
    return BuildConfig.model_validate(config).seeded(args.seed)


def _build(args: argparse.Namespace) -> None:
    folder = None
    if args.data is not None:
        log(f"reading {args.data}: every image, label and mask, before anything trains")
        folder = read_folder(args.data)
        for line in folder.describe():
            log(line)
    config = _build_config(args, folder)
    from model_build.build import build  # torch, which only the build of our UNets needs: once the data is read

    default_out = Path("models") / (folder.root.name if folder is not None else args.preset)
    build(config, args.out or default_out, folder, args.resume)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            _build(args)
        else:
            fuse_files(
                FuseRequest(
                    members=args.members,
                    out=args.out,
                    name=args.name,
                    rules=dict(args.combine),
                    weights=args.weights,
                    image=_image_options(args),
                    calibration=args.calibration,
                    evaluation=args.evaluation,
                    max_accuracy_loss=args.max_accuracy_loss,
                )
            )
    except (FusionError, FusedMismatchError, FileNotFoundError, ValueError) as exc:  # DatasetError, ValidationError
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
