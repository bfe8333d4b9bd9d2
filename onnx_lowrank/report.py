"""Reports: per-layer records, whole-model summaries, JSON and terminal tables.

The records themselves are plain data (records.py); ``format_*`` give the text the CLI prints,
``write_json``/``write_npz`` the files of ``--report``/``--save-spectra``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .config import ALL_OUTPUTS
from .errors import OutputPathError
from .records import (
    NOT_A_TASK_METRIC,
    CompressionReport,
    InspectionReport,
    LayerReport,
    TensorInfo,
    ValidationReport,
)
from .save import write_file

__all__ = [
    "count_text",
    "format_inspection",
    "format_layers",
    "format_summary",
    "format_sweep",
    "format_tolerances",
    "format_validation",
    "write_json",
    "write_npz",
]


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"report folder {folder} does not exist; create it first")

    def dump(stream: BinaryIO) -> None:
        stream.write(json.dumps(data, indent=2).encode("utf-8") + b"\n")

    return write_file(target, dump, "report")


def write_npz(arrays: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write arrays keyed by name as an ``.npz`` archive, atomically."""
    target = Path(path)

    def dump(stream: BinaryIO) -> None:
        np.savez(stream, **arrays)

    return write_file(target, dump, "array file")


def count_text(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


#: How a MAC count that depends on an unknown (dynamic) input size is printed.
UNKNOWN_MACS = "n/a (dynamic)"


def _macs(value: int | None) -> str:
    return UNKNOWN_MACS if value is None else count_text(value)


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_layers(layers: list[LayerReport], *, compression: bool = True) -> str:
    """The per-layer table: name, op, shape, g, r, params, MACs, errors, measured latency
    (dense and chosen, when candidates were timed) or skip reason."""
    rows = []
    outputs = compression and any(layer.output_error_estimate is not None for layer in layers)
    timed = compression and any(layer.latency_ms_before is not None for layer in layers)
    for layer in layers:
        shape = "x".join(map(str, layer.weight_shape)) if layer.weight_shape else "-"
        row = [layer.name, layer.op_type, shape]
        if compression:
            row += [
                "-" if layer.groups is None else str(layer.groups),
                "-" if layer.rank is None else str(layer.rank),
                count_text(layer.params_before),
                count_text(layer.params_after),
                _error(layer.error_bound),
                _error(layer.error_actual),
            ]
            if outputs:
                row += [
                    _error(layer.output_error_estimate),
                    _error(layer.output_error),
                    _error(layer.output_error_network),
                ]
            if timed:
                row += [_ms(layer.latency_ms_before), _ms(layer.latency_ms_after)]
        else:
            row += [count_text(layer.params_before), _macs(layer.macs_before)]
        notes = [layer.skipped_reason] if layer.skipped_reason else []
        if layer.user_choice and layer.user_choice not in notes:
            notes.append(layer.user_choice)
        if layer.shared_with:
            notes.append(f"weight shared by {1 + len(layer.shared_with)} nodes")
        row.append("; ".join(notes))
        rows.append(row)
    header = ["layer", "op", "weight"]
    header += (
        ["g", "r", "params", "after", "bound", "actual"] if compression else ["params", "MACs"]
    )
    if outputs:
        header += ["out est", "out err", "in net"]
    if timed:
        header += ["ms", "ms after"]
    header.append("note")
    return _table(header, rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _tensor_line(info: TensorInfo) -> str:
    shape = "?" if info.shape is None else "(" + ", ".join(map(str, info.shape)) + ")"
    return f"  {info.name}: {info.dtype} {shape}"


def format_inspection(report: InspectionReport) -> str:
    """What ``inspect`` prints: inputs, outputs, opsets, the layer table, parameter shares."""
    opsets = ", ".join(
        f"{domain or 'ai.onnx'} {version}" for domain, version in sorted(report.opsets.items())
    )
    lines = [f"model: {report.source}", f"IR version {report.ir_version}, opset {opsets}"]
    lines += ["inputs:", *map(_tensor_line, report.inputs)]
    lines += ["outputs:", *map(_tensor_line, report.outputs), ""]
    lines += [format_layers(report.layers, compression=False), ""]
    compressible = sum(1 for layer in report.layers if layer.skipped_reason is None)
    lines.append(
        f"{report.params:,} parameters, "
        + ("MACs n/a (dynamic)" if report.macs is None else f"{report.macs:,} MACs")
        + ", "
        f"{compressible} compressible layer(s) of {len(report.layers)}"
    )
    if report.shares is not None:
        for label, value, share in report.shares.parts():
            lines.append(f"  {share:6.1%}  {value:>12,}  {label}")
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def format_summary(report: CompressionReport) -> str:
    """Before/after summary: params, MACs, file size, max layer error, validation."""

    def ratio(after: float | None, before: float | None) -> str:
        return f"{after / before:.1%}" if before and after is not None else "-"

    rows = [
        [
            "parameters",
            count_text(report.params_before),
            count_text(report.params_after),
            ratio(report.params_after, report.params_before),
        ],
        [
            "MACs",
            _macs(report.macs_before),
            _macs(report.macs_after),
            ratio(report.macs_after, report.macs_before),
        ],
        [
            "file size",
            _bytes(report.size_bytes_before),
            _bytes(report.size_bytes_after),
            ratio(report.size_bytes_after, report.size_bytes_before),
        ],
    ]
    text = [_table(["", "before", "after", "kept"], rows)]
    text.append(
        f"layers factorized: {len(report.compressed_layers)} of "
        f"{sum(1 for layer in report.layers if layer.weight_shape)}; "
        + (
            "layer errors not measured (a recipe: no spectra)"
            if report.compressed_layers
            and all(layer.error_actual is None for layer in report.compressed_layers)
            else f"max layer error: bound {report.max_error_bound:.4f}, "
            f"actual {report.max_error_actual:.4f}"
        )
    )
    if report.shares is not None:
        text.append(
            "parameters of the input: "
            + ", ".join(f"{share:.1%} {label}" for label, _, share in report.shares.parts())
        )
    measure = report.config.get("error")
    if report.calibration is not None:
        text.append(
            f"calibration: {report.calibration['samples']} samples from "
            f"{report.calibration['file']}; error measure: {measure}"
            + (f"; {_refit_text(report)}" if _refit_text(report) else "")
            + (
                ""
                if report.max_output_error is None
                else f"; max layer output error {report.max_output_error:.4f} (measured, "
                "relative to the output's spread)"
            )
        )
    elif measure is not None:
        text.append(f"error measure: {measure} (data-free)")
    text.append(format_latency(report))
    if report.validation_skipped is not None:
        text.append(f"validation: {report.validation_skipped}")
    else:
        text.append(format_validation(report.validation))
    return "\n".join(line for line in text if line)


def _refit_text(report: CompressionReport) -> str:
    """Whether the sequential refit (refit.py) ran, for the calibration line."""
    if "refit" not in report.config:  # a report of a version without the refit
        return ""
    refitted = report.calibration.get("refitted_layers")
    if refitted:
        return f"refit: {refitted} layer(s)"
    return "refit: no layer refitted" if report.config["refit"] else "refit: off (--no-refit)"


def format_latency(report: CompressionReport) -> str:
    """The candidate timing line, and a warning when the compressed model measured slower."""
    lines = []
    latency = report.latency
    if latency is not None:
        lines.append(
            f"latency on {latency['provider']} ({latency['device']}): predicted "
            f"{latency['predicted_ratio']:.1%} of the original's {latency['model_ms']:.3f} ms"
            + (
                ""
                if latency["measured_ratio"] is None
                else f", measured {latency['measured_ratio']:.1%}"
            )
            + f"; candidates timed in {latency['seconds']:.1f} s ({latency['measured']} "
            f"measured, {latency['cached']} from the cache)"
        )
    validation = report.validation
    if validation is not None and validation.latency_ms_before and validation.latency_ms_after:
        ratio = validation.latency_ms_after / validation.latency_ms_before
        if ratio > 1:
            lines.append(
                f"warning: the compressed model measured SLOWER than the original "
                f"({ratio:.2f}x its latency); --max-latency-ratio 1 makes this a failure"
            )
    return "\n".join(lines)


def format_validation(validation: ValidationReport | None) -> str:
    """The validation part of the summary: what the verdict rests on (samples, random or real
    inputs, the tolerances and the outputs each was checked on), per-output metrics, latency
    with its spread, failures and warnings."""
    if validation is None:
        return "validation: skipped"
    if not validation.passed:
        status = "FAILED"
    elif validation.tolerances:
        status = f"PASSED ({format_tolerances(validation)})"
    else:  # nothing but shapes and NaN/Inf was checked: do not call it good
        status = "ran (no tolerances set: only shapes and NaN/Inf were checked)"
    samples = "?" if validation.samples is None else f"{validation.samples:,}"
    if validation.random_inputs:
        source = f"{validation.inputs} inputs, {samples} samples"
    else:
        source = f"real inputs from {validation.inputs}, {samples} samples"
    lines = [f"validation on {validation.provider} with {source}: {status}"]
    if validation.random_inputs and validation.outputs:
        lines.append(f"  note: {NOT_A_TASK_METRIC}")
    for output in validation.outputs:
        top1 = ""
        if output.top1_agreement is not None:
            top1 = (
                f", top-1 agree {output.top1_agreement:.1%} of {output.top1_positions:,} positions"
            )
        lines.append(
            f"  {output.name}: max abs {output.max_abs_error:.4g}, rel L2 "
            f"{output.rel_l2_error:.4g}, cosine {output.cosine_similarity:.6f}{top1}"
        )
    if validation.latency_before is not None and validation.latency_after is not None:
        before, after = validation.latency_before, validation.latency_after
        batch = "" if validation.latency_batch is None else f", batch {validation.latency_batch}"
        threads = validation.latency_threads
        lines.append(
            f"  latency ({validation.latency_runs} interleaved pairs after "
            f"{validation.latency_warmup} warm-up, {threads} thread{'s' * (threads != 1)}"
            f"{batch}; median [min-max]): {_latency(before)} -> {_latency(after)} ms "
            f"({after.median_ms / before.median_ms:.2f}x the time)"
        )
    lines += [f"  FAILED: {failure}" for failure in validation.failures]
    lines += [
        f"  warning: {output.name} is far from the original (cosine "
        f"{output.cosine_similarity:.3f}); the model may be broken: check it on real inputs "
        "(--inputs) with tolerances, raise the budget, or use --calibration"
        for output in validation.far_outputs
    ]
    return "\n".join(lines)


def format_tolerances(validation: ValidationReport) -> str:
    """Each tolerance with its value(s) and the outputs it was checked on, e.g.
    ``--min-top1 0.95 on logits; --max-rel-error 0.1 on all 3 outputs``; outputs a tolerance
    for every output could not apply to are named."""
    parts = []
    checked_on, skipped = validation.checked_on, validation.not_applicable
    for name, value in validation.tolerances.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, dict):
            values = " ".join(
                f"{limit:g}" if output == ALL_OUTPUTS else f"{output}:{limit:g}"
                for output, limit in sorted(value.items(), key=lambda i: i[0] != ALL_OUTPUTS)
            )
        else:
            values = f"{value:g}"
        outputs = checked_on.get(name, [])
        where = (
            f"all {len(outputs)} outputs"
            if len(outputs) == len(validation.outputs) and len(outputs) > 1
            else ", ".join(outputs) or "no output"
        )
        text = f"{flag} {values} on {where}"
        if skipped.get(name):
            text += f", not applicable to {', '.join(skipped[name])} (no class axis)"
        parts.append(text)
    return "; ".join(parts)


def _latency(stats) -> str:
    return f"{stats.median_ms:.3f} [{stats.min_ms:.3f}-{stats.max_ms:.3f}]"


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """One line per sweep point: method, budget, what was kept, errors, validation, and the
    verdict (FAILED points are marked; their models were not written)."""
    table = []
    for row in rows:
        budget = " ".join(
            f"{flag} {row[flag]:g}"
            for flag in ("params", "flops", "latency")
            if row.get(flag) is not None
        )
        first = row["outputs"][0] if row["outputs"] else None
        validation = "-"
        if first is not None:
            validation = f"rel L2 {first['rel_l2_error']:.4g}"
            if first["top1_agreement"] is not None:
                validation += f", top-1 {first['top1_agreement']:.1%}"
            if row.get("validation_inputs") == "random":
                validation += " (random inputs)"
        macs = row["macs_fraction"]
        before, after = row.get("latency_ms_before"), row.get("latency_ms_after")
        table.append(
            [
                row["method"],
                budget,
                f"{row['params_fraction']:.1%}",
                UNKNOWN_MACS if macs is None else f"{macs:.1%}",
                f"{after / before:.1%}" if before and after is not None else "-",
                _error(row["max_error_bound"]),
                _error(row["max_error_actual"]),
                validation,
                _verdict(row),
            ]
        )
    header = [
        "method",
        "budget",
        "params",
        "MACs",
        "latency",
        "bound",
        "actual",
        "validation",
        "verdict",
    ]
    return _table(header, table)


def _verdict(row: dict[str, Any]) -> str:
    passed = row["validation_passed"]
    if passed is None:
        return "-"
    if passed is False:
        return "FAILED"
    return "passed" if row.get("tolerances_checked") else "ran"
