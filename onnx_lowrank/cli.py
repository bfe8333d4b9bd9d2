"""Command line: ``onnx-lowrank compress|inspect|sweep|make-calibration``.

A thin layer over the Python API: it parses arguments, renders progress and tables, and turns
every ``OnnxLowRankError`` into one line on stderr and an exit code. It is the only place that
configures logging.

Exit codes (``EXIT_CODES``, also listed by ``--help``): 0 success (or nothing to compress),
2 bad input or options (or out of memory), 3 validation failed, 1 internal error, 130
interrupted (Ctrl-C), 143 terminated (SIGTERM).

The options are declared in ``cli_options.py``; ``cli_files.py`` fills them from ``--config``
and ``--recipe`` files.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import NoReturn

from .cli_files import apply_files, given_options
from .cli_options import build_parser
from .config import CompressionConfig, parse_input_shapes, parse_tolerances
from .data import IMAGE_EXTENSIONS, ImagePreprocessing, images_to_batch, model_input
from .errors import (
    ConfigError,
    NothingToCompressError,
    OnnxLowRankError,
    OutOfMemoryError,
    OutputPathError,
)
from .load import external_data_files, open_model
from .pipeline import compress, inspect
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
from .sweeps import sweep

__all__ = ["main"]

log = logging.getLogger("onnx_lowrank")


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
            by_sample = stage in ("calibrate", "output-error", "synthetic")
            by_sample = by_sample or stage.startswith("refit")
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
    config = _run_config(args, method=args.method[0] if args.method else None)
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
        apply_files(args, given_options(argv), parser.commands)  # type: ignore[attr-defined]
    return args


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
