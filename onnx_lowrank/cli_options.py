"""The command line's options: ``build_parser`` and the argparse types of the values.

Every option of ``compress``, ``inspect``, ``sweep`` and ``make-calibration`` is declared here,
with its help text; ``cli.py`` runs the commands, ``cli_files.py`` fills options from
``--config`` and ``--recipe`` files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from . import __version__
from .config import (
    DEVICES,
    ERROR_MEASURES,
    HEAD_FLOOR,
    METHODS,
    ROW_FLOOR,
    CompressionConfig,
)
from .errors import ConfigError

__all__ = ["COMMANDS", "EXIT_CODES", "build_parser", "fractions", "methods"]

#: The subcommands.
COMMANDS = ("compress", "inspect", "sweep", "make-calibration")

#: Exit codes of every command, as ``--help`` lists them.
EXIT_CODES = """exit codes:
  0    success (also when there is nothing to compress)
  1    internal error (a bug: rerun with --debug and report it)
  2    bad input or options, or out of memory (one line on stderr)
  3    validation failed (the model is not written; the report still is)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like every other error of the tool, and
    that takes no abbreviated options (``--latency-r 3`` must not mean ``--latency-runs 3``)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see '{self.prog} --help'")


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None


def fractions(text: str) -> list[float]:
    """Comma-separated fractions: sweep's budgets."""
    return [_fraction(part) for part in text.split(",") if part.strip()]


def _max_groups(text: str) -> int | str | None:
    """A positive integer or 'all' (None); also --latency-threads."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        return text  # CompressionConfig says what is allowed


def _rank_multiple(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        return text  # CompressionConfig says what is allowed


def methods(text: str) -> list[str]:
    """Comma-separated allocation methods: sweep's --method."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method {', '.join(unknown) or repr(text)}; choose from {', '.join(METHODS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-lowrank",
        description="Compress ONNX models after export by grouped low-rank factorization.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = {}  # type: ignore[attr-defined]

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser.commands[name] = commands.add_parser(  # type: ignore[attr-defined]
            name,
            help=help,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return parser.commands[name]  # type: ignore[attr-defined]

    run = command("compress", "compress a model to a budget")
    run.add_argument("input", help="the .onnx model to compress (never modified)")
    run.add_argument(
        "output", nargs="?", help="where to write the compressed model (or give -o OUTPUT)"
    )
    run.add_argument(
        "-o", "--output", dest="output_option", metavar="OUTPUT", help="the same as OUTPUT"
    )
    _add_run_options(run, sweep=False)

    show = command("inspect", "list inputs, outputs, layers, shapes, params, MACs, skip reasons")
    show.add_argument("input", help="the .onnx model")
    _add_shape_options(show)
    show.add_argument("--report", metavar="FILE.json", help="write the listing as JSON")
    show.add_argument(
        "--json", action="store_true", help="print the listing as JSON on stdout (for scripts)"
    )
    _add_common(show)

    many = command("sweep", "compress to several budgets and methods; trade-off JSON and plot")
    many.add_argument("input", help="the .onnx model to compress (never modified)")
    many.add_argument(
        "-o", "--out", required=True, metavar="DIR", help="folder for models and JSON"
    )
    _add_run_options(many, sweep=True)

    images = command(
        "make-calibration",
        "turn a folder of images into calibration (or validation) inputs for a model",
    )
    _add_image_options(images)
    return parser


def _floats(text: str) -> tuple[float, ...]:
    """``M`` or ``M1,M2,M3``; each may be a fraction ``1/255``."""
    values = []
    for part in text.split(","):
        number, slash, divisor = part.partition("/")
        try:
            values.append(float(number) / (float(divisor) if slash else 1.0))
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(
                f"expected numbers like 0.5, 1/255 or 0.485,0.456,0.406; got {text!r}"
            ) from None
    return tuple(values)


def _add_image_options(images: argparse.ArgumentParser) -> None:
    images.description = (
        "Every image in IMAGES (png, jpg, jpeg, bmp, gif, tif, tiff, webp), sorted by name, "
        "becomes one sample: converted to RGB (or grayscale), shorter side resized to --resize "
        "(bicubic), centre-cropped to the model's input size, normalised as "
        "(pixel*scale - mean)/std on 0..255 values, laid out NCHW or NHWC as float32, and saved "
        "under the model's input name in OUT.npz, as --calibration and --inputs take it. "
        "Needs Pillow."
    )
    images.add_argument("images", type=Path, help="folder of images")
    images.add_argument("out", type=Path, help="the .npz file to write")
    images.add_argument("--model", type=Path, help="read the input name and size from it")
    images.add_argument("--input", help="input name (default: the model's only input)")
    images.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="crop size")
    images.add_argument("--resize", type=int, help="shorter side before the crop (bicubic)")
    images.add_argument(
        "--scale", type=_floats, default=(1 / 255,), help="factor on 0..255 pixels (default 1/255)"
    )
    images.add_argument("--mean", type=_floats, default=(0.0,), help="M or M1,M2,M3 (default 0)")
    images.add_argument("--std", type=_floats, default=(1.0,), help="S or S1,S2,S3 (default 1)")
    images.add_argument("--grayscale", action="store_true", help="one channel")
    images.add_argument("--bgr", action="store_true", help="BGR channel order")
    images.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw")
    images.add_argument(
        "--crops",
        type=int,
        default=1,
        help="samples per image: the whole image, then random square regions (a third of the "
        "area or more, every other one mirrored; default 1)",
    )
    images.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    images.add_argument("--limit", type=int, help="use at most this many images")
    images.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    images.add_argument("-v", "--verbose", action="store_true", help="print progress details")
    images.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _add_run_options(run: argparse.ArgumentParser, *, sweep: bool) -> None:
    """Options of compress and sweep; sweep takes lists of budgets and methods."""
    budget = run.add_argument_group("budget (at least one; all given must hold)")
    lists = " (comma-separated list; with several lists, one point per position)" if sweep else ""
    budget.add_argument(
        "--params",
        type=fractions if sweep else _fraction,
        metavar="F1,F2,..." if sweep else "F",
        help="fraction of the model's total parameters to keep, in (0, 1]" + lists,
    )
    budget.add_argument(
        "--flops",
        type=fractions if sweep else _fraction,
        metavar="F1,F2,..." if sweep else "F",
        help="fraction of the model's MACs (Conv/Gemm/MatMul) to keep, in (0, 1]" + lists,
    )
    budget.add_argument(
        "--latency",
        type=fractions if sweep else _fraction,
        metavar="F1,F2,..." if sweep else "F",
        help="fraction of the model's latency to keep, measured on the execution provider "
        "(candidates timed and cached, see docs/performance.md)" + lists,
    )
    method = run.add_argument_group("method")
    method.add_argument(
        "--method",
        default=None,
        type=methods if sweep else str,
        choices=None if sweep else METHODS,
        metavar="NAME[,NAME...]" if sweep else None,
        help=f"allocation method{'s' if sweep else ''}: {', '.join(METHODS)} "
        "(default: sum with --error network, which --calibration defaults to, else alds)",
    )
    method.add_argument(
        "--error",
        default=CompressionConfig.error,
        choices=ERROR_MEASURES,
        help="layer error measure (default: network with --calibration, else bound); "
        "frobenius: the exact relative Frobenius weight error (docs/methods.md); "
        "network: the network outputs' degradation per candidate (docs/calibration.md)",
    )
    method.add_argument(
        "--sensitivity-samples",
        type=int,
        default=CompressionConfig.sensitivity_samples,
        metavar="N",
        help="with --error network: samples the degradations are measured on, held out from "
        "--calibration; without it, taken from --inputs or made synthetic "
        f"(default: {CompressionConfig.sensitivity_samples})",
    )
    method.add_argument(
        "--max-groups",
        type=_max_groups,
        default=CompressionConfig.max_groups,
        metavar="N|all",
        help="largest channel-group count tried, or 'all' divisors of the input channels "
        "(default: all)",
    )
    method.add_argument(
        "--groups",
        type=int,
        default=CompressionConfig.groups,
        metavar="N",
        help="fixed group count of methods that do not search it",
    )
    method.add_argument(
        "--rank-multiple",
        type=_rank_multiple,
        default=CompressionConfig.rank_multiple,
        metavar="N|auto",
        help="make every groups*rank a multiple of N (e.g. 8); auto: Conv candidates aligned "
        "to the execution provider's channel block (16 with AVX-512, 8 with AVX2 or a GPU)",
    )
    method.add_argument(
        "--no-fold",
        dest="fold_batchnorm",
        action="store_false",
        help="do not fold BatchNormalization / per-channel Mul/Add into the preceding Conv",
    )
    method.add_argument(
        "--device",
        default=CompressionConfig.device,
        choices=DEVICES,
        help="where spectra and validation run (default: %(default)s)",
    )
    method.add_argument(
        "--seed",
        type=int,
        default=CompressionConfig.seed,
        help="seed of random inputs and randomized methods",
    )
    method.add_argument(
        "--no-latency-check",
        dest="latency_check",
        action="store_false",
        default=None,
        help="do not time the chosen candidates; by default a candidate measured slower than "
        "its dense layer is never chosen",
    )
    _add_calibration_option(method)
    method.add_argument(
        "--calibration-samples",
        type=int,
        default=CompressionConfig.calibration_samples,
        metavar="N",
        help="use N evenly spaced samples of --calibration (deterministic; default: all)",
    )
    method.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=CompressionConfig.refit,
        help="with --calibration (on by default there; --no-refit turns it off): refit each "
        "factorized layer's left factor and bias in topological order on the partly "
        "compressed model's inputs (docs/calibration.md)",
    )
    _add_shape_options(run)
    _add_layer_options(run, sweep=sweep)
    check = run.add_argument_group("validation")
    check.add_argument(
        "--no-validate",
        dest="validate",
        action="store_false",
        help="skip the ONNX Runtime comparison (an error together with tolerances or "
        "--inputs, which it would ignore)",
    )
    check.add_argument(
        "--inputs",
        metavar="FILE.npz|FILE.npy|DIR",
        help="validation inputs: .npz keyed by input name, .npy (one input), or a folder of "
        ".npy files, one per input name or one per sample (default: random)",
    )
    for flag, what in (
        ("--max-rel-error", "an output's relative L2 error exceeds X"),
        ("--min-cosine", "an output's cosine similarity is below X (X in [0, 1])"),
        (
            "--min-top1",
            "an output's top-1 agreement (argmax over the last axis, every position "
            "counted) is below X (X in [0, 1])",
        ),
    ):
        check.add_argument(
            flag,
            action="append",
            metavar="[OUTPUT:]X",
            help=f"fail when {what}; X alone applies to every output, OUTPUT:X to one "
            "(repeat the option for several)",
        )
    check.add_argument(
        "--latency-runs",
        type=int,
        default=CompressionConfig.latency_runs,
        metavar="N",
        help="most timed interleaved pairs of runs (default: %(default)s; after 5 pairs it "
        "stops once 1 s of runs are timed)",
    )
    check.add_argument(
        "--latency-threads",
        type=_max_groups,
        default=CompressionConfig.latency_threads,
        metavar="N|all",
        help="intra-op threads of both models' ONNX Runtime sessions, or 'all' CPUs this "
        "process may use (default: %(default)s, the most repeatable timing)",
    )
    check.add_argument(
        "--max-latency-ratio",
        type=float,
        metavar="X",
        help="fail when the compressed model's measured latency exceeds X times the original's",
    )
    out = run.add_argument_group("output")
    if not sweep:
        out.add_argument("--report", metavar="FILE.json", help="write the full report as JSON")
        out.add_argument(
            "--plot",
            metavar="FILE.png",
            help="draw every layer's parameters before/after and its errors (needs the plot extra)",
        )
    out.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the weights in OUTPUT.data beside the model (default: when the input had "
        "external data or the output exceeds 2 GiB)",
    )
    if not sweep:
        out.add_argument(
            "--always-write",
            action="store_true",
            help="write OUTPUT even when nothing can be compressed (an unchanged copy)",
        )
        out.add_argument(
            "--overwrite", action="store_true", help="allow OUTPUT to be the same file as INPUT"
        )
        out.add_argument("--timings", action="store_true", help="print the time of every stage")
    _add_common(run)


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        "--input-shapes",
        dest="input_shapes",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME:D1,D2,...",
        help="concrete shape of a dynamic input, as NAME:1,3,224,224 or NAME:1x3x224x224; "
        "several per option (x:1,3,224,224 y:1,10) or one option per input. compress and sweep "
        "default to the sizes of the --inputs or --calibration arrays; without sizes a --params "
        "budget still compresses (validation on random inputs skipped, MACs n/a), --flops not",
    )


def _add_calibration_option(parser) -> None:
    parser.add_argument(
        "--calibration",
        metavar="FILE.npz|FILE.npy|DIR",
        help="real inputs, batch first, in any format of --inputs: factorize each layer to keep "
        "its outputs on them (whitened SVD, bias correction); see docs/calibration.md",
    )
    parser.add_argument(
        "--row-floor",
        type=float,
        default=ROW_FLOOR,
        metavar="F",
        help="with --calibration: share of uniform weight mixed into the row weights of "
        "embedding tables (id counts); 1 turns the weighting off (default: %(default)s; "
        "docs/calibration.md)",
    )
    parser.add_argument(
        "--head-floor",
        type=float,
        default=HEAD_FLOOR,
        metavar="F",
        help="with --calibration: the same for classifier heads (class probability mass); "
        "default %(default)s, no weighting (it hurt a recognizer; docs/calibration.md)",
    )


def _add_layer_options(run: argparse.ArgumentParser, *, sweep: bool) -> None:
    layers = run.add_argument_group(
        "layer control (names as 'inspect' lists them; the budget goes to the other layers)"
    )
    layers.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep matching layers dense: a layer name, an op type (Gemm) or a regular "
        "expression over whole names ('/encoder/.*'); repeatable",
    )
    layers.add_argument(
        "--rank",
        dest="ranks",
        action="append",
        default=[],
        metavar="NAME=R",
        help="factorize layer NAME at rank R (0: keep it dense), with --groups-for NAME or "
        "else 1 group; repeatable",
    )
    layers.add_argument(
        "--groups-for",
        dest="groups_for",
        action="append",
        default=[],
        metavar="NAME=G",
        help="give layer NAME G channel groups (the allocator chooses its rank unless --rank "
        "pins it); repeatable",
    )
    if not sweep:
        layers.add_argument(
            "--recipe",
            metavar="REPORT.json",
            help="apply the per-layer (g, r) of an earlier run's --report (or a sweep point's "
            "JSON) with its recorded options: the same input gives the same model, byte for "
            "byte, without spectra or allocation; flags override the recorded options",
        )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read options from a TOML or JSON file (keys are option names: params = 0.5, "
        "exclude = ['Gemm'], [ranks] fc = 8); flags on the command line override it",
    )
    parser.add_argument(
        "--force", action="store_true", help="go on with a model that fails the ONNX checker"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
