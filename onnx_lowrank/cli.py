"""Command line: ``onnx-lowrank compress|inspect|sweep``.

A thin layer over the Python API: it parses arguments, renders progress and tables, and turns
every ``OnnxLowRankError`` into one line on stderr and an exit code. It is the only place that
configures logging.

Exit codes (``EXIT_CODES``, also listed by ``--help``): 0 success (or nothing to compress),
2 bad input or options (or out of memory), 3 validation failed, 1 internal error, 130
interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .choices import read_recipe
from .config import (
    DEVICES,
    ERROR_MEASURES,
    HEAD_FLOOR,
    METHODS,
    ROW_FLOOR,
    TOLERANCES,
    CompressionConfig,
    parse_input_shapes,
    parse_tolerances,
)
from .data import IMAGE_EXTENSIONS, ImagePreprocessing, images_to_batch, model_input
from .errors import (
    ConfigError,
    NothingToCompressError,
    OnnxLowRankError,
    OutOfMemoryError,
    OutputPathError,
)
from .load import external_data_files, open_model
from .pipeline import compress, inspect, sweep
from .plots import plot_layers, require_matplotlib
from .report import (
    format_inspection,
    format_layers,
    format_summary,
    format_sweep,
    write_json,
    write_npz,
)
from .save import check_output_path, same_file, save_model

__all__ = ["main"]

log = logging.getLogger("onnx_lowrank")

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


def _fractions(text: str) -> list[float]:
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


def _methods(text: str) -> list[str]:
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


def _make_calibration(args: argparse.Namespace) -> int:
    name, dims = args.input or "input", [None, None, None, None]
    if args.model is not None:
        name, dims = model_input(open_model(args.model).model, args.input)
    spatial = dims[2:4] if args.layout == "nchw" else dims[1:3]
    size = tuple(args.size) if args.size else tuple(spatial)
    if len(size) != 2 or None in size:
        raise ConfigError("the model's input size is dynamic or unknown; give --size H W")
    if not args.images.is_dir():
        raise ConfigError(f"{args.images} is not a folder of images")
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if args.limit is not None:
        paths = paths[: args.limit]
    if not paths:
        raise ConfigError(f"no images in {args.images} ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if args.crops < 1:
        raise ConfigError(f"--crops must be a positive integer, got {args.crops}")
    _check_output(args.images, args.out, False)
    options = ImagePreprocessing(
        size=size,  # type: ignore[arg-type]
        resize=args.resize,
        scale=args.scale[0],
        mean=args.mean,
        std=args.std,
        grayscale=args.grayscale,
        bgr=args.bgr,
        layout=args.layout,
        crops=args.crops,
        seed=args.seed,
    )
    batch = images_to_batch(paths, options)
    write_npz({name: batch}, args.out)
    if not args.quiet:
        print(f"wrote {len(batch)} samples of shape {batch.shape[1:]} as {name!r} to {args.out}")
    return 0


def _add_run_options(run: argparse.ArgumentParser, *, sweep: bool) -> None:
    """Options of compress and sweep; sweep takes lists of budgets and methods."""
    budget = run.add_argument_group("budget (at least one; all given must hold)")
    lists = " (comma-separated list; with several lists, one point per position)" if sweep else ""
    budget.add_argument(
        "--params",
        type=_fractions if sweep else _fraction,
        metavar="F1,F2,..." if sweep else "F",
        help="fraction of the model's total parameters to keep, in (0, 1]" + lists,
    )
    budget.add_argument(
        "--flops",
        type=_fractions if sweep else _fraction,
        metavar="F1,F2,..." if sweep else "F",
        help="fraction of the model's MACs (Conv/Gemm/MatMul) to keep, in (0, 1]" + lists,
    )
    budget.add_argument(
        "--latency",
        type=_fractions if sweep else _fraction,
        metavar="F1,F2,..." if sweep else "F",
        help="fraction of the model's latency to keep, measured on the execution provider "
        "(candidates timed and cached, see docs/performance.md)" + lists,
    )
    method = run.add_argument_group("method")
    method.add_argument(
        "--method",
        default=[CompressionConfig.method] if sweep else CompressionConfig.method,
        type=_methods if sweep else str,
        choices=None if sweep else METHODS,
        metavar="NAME[,NAME...]" if sweep else None,
        help=f"allocation method{'s' if sweep else ''}: {', '.join(METHODS)} "
        f"(default: {CompressionConfig.method})",
    )
    method.add_argument(
        "--error",
        default=CompressionConfig.error,
        choices=ERROR_MEASURES,
        help="layer error measure (default: output with --calibration, else bound); "
        "network: the network outputs' degradation per candidate (docs/calibration.md)",
    )
    method.add_argument(
        "--sensitivity-samples",
        type=int,
        default=CompressionConfig.sensitivity_samples,
        metavar="N",
        help="with --error network: samples the degradations are measured on, held out from "
        f"--calibration (default: {CompressionConfig.sensitivity_samples})",
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
        help="with --calibration: refit each factorized layer's left factor and bias in "
        "topological order on the partly compressed model's inputs (docs/calibration.md)",
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


class _ProgressBars:
    """Renders ``progress(stage, done, total)`` callbacks as tqdm bars on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, object] = {}
        self.stage: str | None = None  # the last stage reported, for out-of-memory messages

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.stage = stage
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            by_sample = stage in ("calibrate", "output-error") or stage.startswith("refit")
            unit = "sample" if by_sample else "layer"
            bar = self.bars[stage] = tqdm(
                total=total, desc=stage, unit=unit, leave=False, file=sys.stderr, disable=None
            )
        bar.n = done
        bar.refresh()
        if done >= total:  # a stage that runs again (latency rounds) gets a new bar
            self.bars.pop(stage).close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _config(args: argparse.Namespace, **extra) -> CompressionConfig:
    shapes = parse_input_shapes(args.input_shapes)
    return CompressionConfig(input_shapes=shapes, force=args.force, **extra)


def _run_config(args: argparse.Namespace, **budget) -> CompressionConfig:
    return _config(
        args,
        **budget,
        error=args.error,
        sensitivity_samples=args.sensitivity_samples,
        max_groups=args.max_groups,
        groups=args.groups,
        rank_multiple=args.rank_multiple,
        device=args.device,
        validate=args.validate,
        inputs=args.inputs,
        max_rel_error=parse_tolerances("--max-rel-error", args.max_rel_error),
        min_cosine=parse_tolerances("--min-cosine", args.min_cosine),
        min_top1=parse_tolerances("--min-top1", args.min_top1),
        latency_runs=args.latency_runs,
        latency_threads=args.latency_threads,
        seed=args.seed,
        calibration=args.calibration,
        row_floor=args.row_floor,
        head_floor=args.head_floor,
        fold_batchnorm=args.fold_batchnorm,
        latency_check=args.latency_check,
        max_latency_ratio=args.max_latency_ratio,
        exclude=tuple(args.exclude),
        ranks=_assignments(args.ranks, "--rank"),
        groups_for=_assignments(args.groups_for, "--groups-for"),
        recipe=getattr(args, "recipe", None),
        **getattr(args, "recorded", {}),
        refit=args.refit,
        calibration_samples=args.calibration_samples,
    )


def _assignments(texts: Sequence[str], flag: str) -> dict[str, int]:
    """``NAME=N`` texts as a dict; the last ``=`` separates (names may contain ``=``)."""
    values: dict[str, int] = {}
    for text in texts:
        name, sep, number = str(text).rpartition("=")
        try:
            value = int(number)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise ConfigError(f"bad {flag} {text!r}: expected NAME=N, for example {flag} fc=8")
        if name in values:
            raise ConfigError(f"{flag} for {name!r} is given twice; give each layer once")
        values[name] = value
    return values


def _output(args: argparse.Namespace) -> str:
    """The compressed model's path, given as OUTPUT or as -o OUTPUT (not both)."""
    if args.output is not None and args.output_option is not None:
        raise ConfigError(
            f"the output is given twice ({args.output} and -o {args.output_option}); give "
            "either 'compress INPUT OUTPUT' or 'compress INPUT -o OUTPUT'"
        )
    output = args.output if args.output is not None else args.output_option
    if output is None:
        raise ConfigError("no output given; use 'onnx-lowrank compress INPUT OUTPUT' or -o OUTPUT")
    return output


def _compress(args: argparse.Namespace) -> int:
    args.output = _output(args)
    config = _run_config(
        args, params=args.params, flops=args.flops, latency=args.latency, method=args.method
    )
    _check_output(Path(args.input), Path(args.output), args.overwrite)
    _check_distinct(args)
    for extra in (args.report, args.plot):
        if extra:
            _check_output(Path(args.input), Path(extra), False)
    if args.plot:
        require_matplotlib()
    bars = _ProgressBars(enabled=not args.quiet)
    try:
        with _memory_context(f"compressing {args.input} ({_size(args.input)})", bars):
            result = compress(args.input, config, progress=bars)
    except NothingToCompressError as exc:
        if not args.always_write:
            raise
        return _write_unchanged(args, exc)
    finally:
        bars.close()
    report = result.report
    validation = report.validation
    saved = validation is None or validation.passed
    with _memory_context(f"writing {args.output}"):
        if saved:
            result.save(args.output, external_data=args.external_data)
        if args.report:
            write_json(report.to_dict(), args.report)
        if args.plot:
            plot_layers(report, args.plot)
    if not args.quiet:
        print(format_layers(report.layers))
        print()
        print(format_summary(report))
        for note in report.notes:
            print(f"note: {note}")
        if args.timings:
            print("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
        if saved:
            print(f"wrote {args.output}")
    if not saved:
        failures = "; ".join(validation.failures)
        print(
            f"onnx-lowrank: validation failed: {failures}; model not written (loosen the "
            "tolerances, or pass --no-validate to write it unchecked)",
            file=sys.stderr,
        )
        return 3
    return 0


def _write_unchanged(args: argparse.Namespace, reason: NothingToCompressError) -> int:
    """``--always-write`` with nothing to compress: write the input model unchanged."""
    loaded = open_model(args.input, force=args.force)
    external = bool(loaded.data_files) if args.external_data is None else args.external_data
    save_model(
        loaded.model,
        args.output,
        external_data=external,
        data_dir=loaded.data_dir,
        protect=loaded.data_files,
        force=args.force,
    )
    if not args.quiet:
        print(f"onnx-lowrank: {reason}", file=sys.stderr)
        print(f"wrote an unchanged copy to {args.output}")
    return 0


def _check_output(source: Path, target: Path, overwrite: bool) -> None:
    if (
        target.exists()
        and source.exists()
        and target.resolve() == source.resolve()
        and not overwrite
    ):
        raise OutputPathError(
            f"output {target} is the input model; choose another path or pass --overwrite"
        )
    if any(same_file(target, data) for data in _input_data_files(source)):
        raise OutputPathError(
            f"output {target} is an external data file of the input model; choose another path"
        )
    check_output_path(target)  # not a directory, device, FIFO or socket
    folder = target.parent if str(target.parent) else Path(".")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"output folder {folder} is not writable; choose another path")


def _check_distinct(args: argparse.Namespace) -> None:
    """-o, --report and --plot name different files, none of them a file of the input model,
    the --inputs or --calibration file, or the output model's external data file
    (``OUTPUT.data``, ``OUTPUT.<n>.data``)."""
    output = Path(args.output)
    data_name = re.compile(re.escape(output.name) + r"(\.[0-9]+)?\.data")
    output_data = (
        _input_data_files(output) if output.is_file() and not same_file(output, args.input) else ()
    )
    data = [(f"the {flag} file", value) for flag, value in _data_options(args) if value]
    clash = next((what for what, other in data if same_file(args.output, other)), None)
    if clash is not None:
        raise OutputPathError(f"-o {args.output} is {clash}; give the output its own file name")
    files = [("--report", args.report), ("--plot", args.plot)]
    for position, (flag, value) in enumerate(files):
        if not value:
            continue
        path = Path(value)
        others = [
            *data,
            ("the input model", Path(args.input)),
            ("the output model (-o)", output),
            *(
                ("an external data file of the input model", f)
                for f in _input_data_files(Path(args.input))
            ),
            *(("an external data file of the output model", f) for f in output_data),
            *((f"the file of {other}", Path(v)) for other, v in files[:position] if v),
        ]
        clash = next((what for what, other in others if same_file(path, other)), None)
        if (
            clash is None
            and data_name.fullmatch(path.name)
            and same_file(path.parent, output.parent)
        ):
            clash = "the output model's external data file"
        if clash is not None:
            raise OutputPathError(f"{flag} {path} is {clash}; give it a file name of its own")


def _data_options(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [("--inputs", args.inputs), ("--calibration", args.calibration)]


@contextlib.contextmanager
def _memory_context(doing: str, bars: _ProgressBars | None = None) -> Iterator[None]:
    """Turn a ``MemoryError`` into a one-line ``OutOfMemoryError`` that says what was being
    done and, when Python or NumPy reported it, the size of the allocation."""
    try:
        yield
    except MemoryError as exc:
        stage = f", stage {bars.stage}" if bars is not None and bars.stage else ""
        raise OutOfMemoryError(_out_of_memory(exc, f"{doing}{stage}")) from exc


def _out_of_memory(exc: MemoryError, doing: str | None) -> str:
    detail = " ".join(str(exc).split())[:200] or "the size of the allocation was not reported"
    where = f" while {doing}" if doing else ""
    return (
        f"out of memory{where}: {detail}; use a machine with more memory, or lower "
        "--max-groups and the validation inputs' size"
    )


def _size(path: str) -> str:
    try:
        return f"a {os.stat(path).st_size / 2**20:,.1f} MiB model file"
    except (OSError, ValueError):  # the load stage reports an unreadable file
        return "size unknown"


def _input_data_files(source: Path) -> tuple[Path, ...]:
    """The input's external data files, or () when it cannot be read (load reports why)."""
    try:
        return external_data_files(source) if source.is_file() else ()
    except Exception:  # a broken input is reported by the load stage, with its own message
        return ()


def _sweep(args: argparse.Namespace) -> int:
    if args.latency and args.latency_check is False:
        raise ConfigError(
            "--latency budgets measured latency, which --no-latency-check turns off; "
            "drop one of them"
        )
    config = _run_config(args, method=args.method[0])
    bars = _ProgressBars(enabled=not args.quiet)
    try:
        with _memory_context(f"sweeping {args.input} ({_size(args.input)})", bars):
            result = sweep(
                args.input,
                config,
                args.out,
                params=args.params or (),
                flops=args.flops or (),
                latency=args.latency or (),
                methods=args.method,
                external_data=args.external_data,
                progress=bars,
            )
    finally:
        bars.close()
    if not args.quiet:
        print(format_sweep(result.rows))
        print(f"wrote {result.json}" + (f" and {result.plot}" if result.plot else ""))
    if result.notice and not args.quiet:
        print(f"onnx-lowrank: note: {result.notice}", file=sys.stderr)
    if not result.passed:
        print(
            "onnx-lowrank: validation failed for some points; their models were not written "
            "(see the rows in sweep.json)",
            file=sys.stderr,
        )
        return 3
    return 0


def _inspect(args: argparse.Namespace) -> int:
    if args.report:  # never onto the model or its data, nor a device, FIFO or folder
        source = Path(args.input)
        if any(same_file(args.report, f) for f in (source, *_input_data_files(source))):
            raise OutputPathError(
                f"--report {args.report} is a file of the input model; give the report a file "
                "name of its own"
            )
        check_output_path(args.report, "--report")
    listing = inspect(args.input, _config(args))
    if args.report:
        write_json(listing.to_dict(), args.report)
    if args.json:
        print(json.dumps(listing.to_dict(), indent=2))
    elif not args.quiet:
        print(format_inspection(listing))
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup that runs for Ctrl-C runs for it."""


def _terminate(number: int, frame: object) -> NoReturn:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the CLI runs, SIGTERM (``kill``) unwinds like Ctrl-C: temporary files and folders
    are removed and the exit code is 143. Only the main thread can install the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    ``compress IN --params 0.5 OUT`` is accepted as well as ``compress IN OUT --params 0.5``:
    argparse fills optional positionals only where they stand, so a lone positional left over
    after the options is taken as OUTPUT.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if (
        args.command == "compress"
        and args.output is None
        and len(extra) == 1
        and not extra[0].startswith("-")
    ):
        args.output, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    shapes = getattr(args, "input_shapes", [])
    if (  # --input-shapes takes several values: an .onnx path after them is OUTPUT
        args.command == "compress"
        and args.output is None
        and args.output_option is None
        and shapes
        and ":" not in shapes[-1]
        and shapes[-1].lower().endswith(".onnx")
    ):
        args.output = shapes.pop()
    if getattr(args, "config", None) or getattr(args, "recipe", None):
        _apply_files(args, _given_options(argv), parser.commands)  # type: ignore[attr-defined]
    return args


def _given_options(argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options given on the command line (not left at defaults)."""
    probe = build_parser()
    for command in probe.commands.values():
        for action in command._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


#: Keys of a --config file or a recipe's config that name an option by another name.
_ALIASES = {"input_shape": "input_shapes", "rank": "ranks", "output": "output_option"}
#: Recorded options a recipe does not carry over: its layers already fix every layer.
_NOT_FROM_RECIPE = {"recipe", "exclude", "ranks", "groups_for"}


def _options(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in command._actions if a.option_strings and a.dest != "help"}


def _apply_files(
    args: argparse.Namespace, given: set[str], commands: dict[str, argparse.ArgumentParser]
) -> None:
    """Fill the options not given on the command line from ``--recipe`` (its recorded config)
    and then ``--config`` (which overrides the recipe); command-line flags override both.

    A config file may hold options of other commands (one file for compress, sweep and
    inspect); those are skipped here. A key that is no command's option is an error.
    """
    actions = _options(commands[args.command])
    everywhere = {dest for command in commands.values() for dest in _options(command)}
    if getattr(args, "output", None) is not None:
        given = given | {"output_option"}  # the positional OUTPUT was given
    from_file = _read_config_file(args.config, args.command) if args.config else {}
    recipe_path = getattr(args, "recipe", None)
    if "recipe" not in given:
        recipe_path = from_file.get("recipe", recipe_path)
    layers: list[tuple[str, dict[str, Any]]] = []
    args.recorded = {}
    if recipe_path and args.command == "compress":
        recipe = read_recipe(recipe_path)
        skip = set(_NOT_FROM_RECIPE)
        if "validate" in given and not args.validate:  # recorded tolerances would conflict
            skip |= {*TOLERANCES, "inputs"}
        recorded = {k: v for k, v in recipe.config.items() if k not in skip}
        fields = {f.name for f in dataclasses.fields(CompressionConfig)}
        for key in list(recorded):
            if key not in actions and key in fields:  # an option without a flag
                args.recorded[key] = recorded.pop(key)
        layers.append((f"--recipe {recipe_path}", recorded))
    layers.append((f"--config {args.config}", from_file))
    for label, values in layers:
        for key, value in values.items():
            dest = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            if dest not in actions:
                if label.startswith("--recipe") or dest in everywhere:
                    continue  # another command's option, or recorded by another version
                known = ", ".join(sorted(everywhere))
                raise ConfigError(f"{label}: {key!r} is not an option of onnx-lowrank; {known}")
            if dest not in given:
                setattr(args, dest, _file_value(actions[dest], value, f"{label}: {key}"))


def _read_config_file(path: str, command: str) -> dict[str, Any]:
    """Options from a TOML or JSON file; a table named after the command overrides the rest."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} cannot be read: {exc}") from None
    try:
        json_file = target.suffix.lower() == ".json"
        data = json.loads(text) if json_file else _toml().loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        kind = "JSON" if target.suffix.lower() == ".json" else "TOML"
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"--config {path} is not valid {kind} ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a table of options, not {type(data)}")
    values = {k: v for k, v in data.items() if k not in COMMANDS}
    section = data.get(command)
    if isinstance(section, dict):
        values.update(section)
    return values


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _file_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from a file in the form argparse would have produced for the flag."""
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
        if value is None:  # a recorded option that was not set
            return []
        if isinstance(value, dict):
            # NAME:DIMS for shapes, OUTPUT:X for tolerances, NAME=N for pins
            separator = "=" if action.dest in ("ranks", "groups_for") else ":"
            return [
                f"{k}{separator}{','.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in value.items()
            ]
        return [str(item) for item in value] if isinstance(value, list) else [str(value)]
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        # the destination says what is on (validate = true, fold_batchnorm = false)
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if action.type in (_fractions, _methods):  # sweep's lists: a list, one value, or "a,b"
        value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where} must be one of {choices}; got {value!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    with _sigterm_raises():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    quiet = False
    try:
        args = parse_args(argv)
        quiet = args.quiet
        level = logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="onnx-lowrank: %(levelname)s: %(message)s")
        if args.command == "compress":
            return _compress(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "make-calibration":
            return _make_calibration(args)
        return _inspect(args)
    except OnnxLowRankError as exc:
        if exc.exit_code != 0:
            print(f"onnx-lowrank: error: {exc}", file=sys.stderr)
        elif not quiet:  # not a failure ("nothing to compress"): a note, silenced by -q
            print(f"onnx-lowrank: {exc}", file=sys.stderr)
        return exc.exit_code
    except _Terminated:
        print("onnx-lowrank: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError as exc:  # outside the steps that name what they allocate
        print(f"onnx-lowrank: error: {_out_of_memory(exc, None)}", file=sys.stderr)
        return OutOfMemoryError.exit_code
    except Exception as exc:  # a bug: one line, unless --debug asks for the traceback
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())[:300]
        print(
            f"onnx-lowrank: internal error: {type(exc).__name__}: {message} (rerun with "
            "--debug for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1
