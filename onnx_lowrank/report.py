"""Reports: per-layer records, whole-model summaries, JSON and terminal tables.

A report is plain data. ``to_dict`` gives the JSON written by ``--report``; ``format_*`` give
the text the CLI prints.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputPathError
from .validate import ValidationReport

__all__ = [
    "CompressionReport",
    "InspectionReport",
    "LayerReport",
    "format_layers",
    "format_summary",
    "format_sweep",
    "plot_sweep",
    "write_json",
]


@dataclass(frozen=True)
class LayerReport:
    """One Conv/Gemm/MatMul of the model, compressed or not.

    ``groups``/``rank`` are None for a layer left dense; ``skipped_reason`` then says why.
    ``error_bound`` is the upper bound ``sqrt(Σ_i σ_{i,r+1}²)/‖W‖₂`` and ``error_actual`` the
    measured ``‖W − Ŵ‖₂/‖W‖₂``.

    With calibration data (calibrate.py), factorized layers also get relative output errors
    ``‖Ŷ − Y‖_F / ‖Y − Ȳ‖_F`` on that data: ``output_error_estimate`` from the whitened
    singular values, ``output_error`` measured for the layer alone (on its original inputs),
    and ``output_error_network`` measured inside the compressed model (errors of earlier
    layers included). They are None without calibration data.
    """

    name: str
    op_type: str
    weight_shape: tuple[int, ...] | None
    groups: int | None
    rank: int | None
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    error_bound: float | None
    error_actual: float | None
    skipped_reason: str | None
    output_error_estimate: float | None = None
    output_error: float | None = None
    output_error_network: float | None = None


@dataclass
class InspectionReport:
    """What ``inspect`` found in a model."""

    source: str
    params: int
    macs: int
    layers: list[LayerReport]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


@dataclass
class CompressionReport:
    """Everything a compression run did and measured."""

    source: str
    version: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_bytes_before: int
    size_bytes_after: int
    max_error_bound: float
    max_error_actual: float
    layers: list[LayerReport]
    validation: ValidationReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_output_error: float | None = None
    calibration: dict[str, Any] | None = None

    @property
    def compressed_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["validation"] = None if self.validation is None else self.validation.to_dict()
        data["params_fraction"] = (
            self.params_after / self.params_before if self.params_before else 1.0
        )
        data["macs_fraction"] = self.macs_after / self.macs_before if self.macs_before else 1.0
        return _plain(data)


def _plain(value: Any) -> Any:
    """JSON-ready: tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"report folder {folder} does not exist; create it first")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, target)
    except OSError as exc:
        raise OutputPathError(f"cannot write report {target}: {exc.strerror or exc}") from exc
    return target


def _count(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


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
    """The per-layer table: name, op, shape, g, r, params, MACs, errors or skip reason."""
    rows = []
    outputs = compression and any(layer.output_error_estimate is not None for layer in layers)
    for layer in layers:
        shape = "x".join(map(str, layer.weight_shape)) if layer.weight_shape else "-"
        row = [layer.name, layer.op_type, shape]
        if compression:
            row += [
                "-" if layer.groups is None else str(layer.groups),
                "-" if layer.rank is None else str(layer.rank),
                _count(layer.params_before),
                _count(layer.params_after),
                _error(layer.error_bound),
                _error(layer.error_actual),
            ]
            if outputs:
                row += [
                    _error(layer.output_error_estimate),
                    _error(layer.output_error),
                    _error(layer.output_error_network),
                ]
        else:
            row += [_count(layer.params_before), _count(layer.macs_before)]
        row.append(layer.skipped_reason or "")
        rows.append(row)
    header = ["layer", "op", "weight"]
    header += (
        ["g", "r", "params", "after", "bound", "actual"] if compression else ["params", "MACs"]
    )
    if outputs:
        header += ["out est", "out err", "in net"]
    header.append("note")
    return _table(header, rows)


def format_summary(report: CompressionReport) -> str:
    """Before/after summary: params, MACs, file size, max layer error, validation."""

    def ratio(after: float, before: float) -> str:
        return f"{after / before:.1%}" if before else "-"

    rows = [
        [
            "parameters",
            _count(report.params_before),
            _count(report.params_after),
            ratio(report.params_after, report.params_before),
        ],
        [
            "MACs",
            _count(report.macs_before),
            _count(report.macs_after),
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
        f"max layer error: bound {report.max_error_bound:.4f}, "
        f"actual {report.max_error_actual:.4f}"
    )
    measure = report.config.get("error")
    if report.calibration is not None:
        text.append(
            f"calibration: {report.calibration['samples']} samples from "
            f"{report.calibration['file']}; error measure: {measure}"
            + (
                ""
                if report.max_output_error is None
                else f"; max layer output error {report.max_output_error:.4f} (measured, "
                "relative to the output's spread)"
            )
        )
    elif measure is not None:
        text.append(f"error measure: {measure} (data-free)")
    text.append(format_validation(report.validation))
    return "\n".join(line for line in text if line)


def format_validation(validation: ValidationReport | None) -> str:
    if validation is None:
        return "validation: skipped"
    lines = [
        f"validation on {validation.provider} with {validation.inputs} inputs: "
        + ("PASSED" if validation.passed else "FAILED")
    ]
    for output in validation.outputs:
        top1 = "" if output.top1_agreement is None else f", top-1 agree {output.top1_agreement:.1%}"
        lines.append(
            f"  {output.name}: max abs {output.max_abs_error:.4g}, rel L2 "
            f"{output.rel_l2_error:.4g}, cosine {output.cosine_similarity:.6f}{top1}"
        )
    if validation.latency_ms_before is not None and validation.latency_ms_after is not None:
        batch = "" if validation.latency_batch is None else f", batch {validation.latency_batch}"
        lines.append(
            f"  latency (median of {validation.latency_runs} runs{batch}): "
            f"{validation.latency_ms_before:.3f} ms -> {validation.latency_ms_after:.3f} ms"
        )
    lines += [f"  FAILED: {failure}" for failure in validation.failures]
    return "\n".join(lines)


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """One line per sweep point: method, budget, what was kept, errors, validation."""
    table = []
    for row in rows:
        budget = " ".join(
            f"{flag} {row[flag]:g}" for flag in ("params", "flops") if row[flag] is not None
        )
        first = row["outputs"][0] if row["outputs"] else None
        validation = "-"
        if first is not None:
            validation = f"rel L2 {first['rel_l2_error']:.4g}"
            if first["top1_agreement"] is not None:
                validation += f", top-1 {first['top1_agreement']:.1%}"
            if row["validation_passed"] is False:
                validation += " FAILED"
        macs = row["macs_fraction"]
        table.append(
            [
                row["method"],
                budget,
                f"{row['params_fraction']:.1%}",
                "?" if macs is None else f"{macs:.1%}",
                _error(row["max_error_bound"]),
                _error(row["max_error_actual"]),
                validation,
            ]
        )
    header = ["method", "budget", "params", "MACs", "bound", "actual", "validation"]
    return _table(header, table)


#: What a sweep says when it cannot draw its plot.
NO_PLOT = "matplotlib is not installed; no plot written (pip install 'onnx-lowrank[plot]')"


def plot_sweep(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike
) -> tuple[Path | None, str | None]:
    """Draw a sweep's trade-off curves into a PNG, atomically.

    Left: the largest layer error bound against the fraction of parameters kept, one line per
    method. Right, when the points were validated: the relative L2 error of the first output.

    Returns:
        ``(path, None)``, or ``(None, notice)`` when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, NO_PLOT
    validated = any(row["outputs"] for row in rows)
    figure = Figure(figsize=(11 if validated else 6, 4.2), layout="constrained")
    axes = figure.subplots(1, 2 if validated else 1, squeeze=False)[0]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        points = sorted(
            (row for row in rows if row["method"] == method), key=lambda r: r["params_fraction"]
        )
        kept = [row["params_fraction"] for row in points]
        axes[0].plot(kept, [row["max_error_bound"] for row in points], marker="o", label=method)
        if validated:
            errors = [
                row["outputs"][0]["rel_l2_error"] if row["outputs"] else math.nan for row in points
            ]
            axes[1].plot(kept, errors, marker="o", label=method)
    axes[0].set_ylabel("max layer error bound")
    axes[0].set_title("weight error")
    if validated:
        axes[1].set_ylabel(f"relative L2 error of {rows[0]['outputs'][0]['name']}")
        axes[1].set_title("output error (validation)")
    for axis in axes:
        axis.set_xlabel("fraction of parameters kept")
        axis.grid(alpha=0.3)
        axis.legend()
    target = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".png", dir=target.parent
        )
        os.close(handle)
        figure.savefig(temporary, dpi=120)
        os.replace(temporary, target)
    except OSError as exc:
        raise OutputPathError(f"cannot write plot {target}: {exc.strerror or exc}") from exc
    return target, None
