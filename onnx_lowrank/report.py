"""Reports: per-layer records, whole-model summaries, JSON and terminal tables.

A report is plain data. ``to_dict`` gives the JSON written by ``--report``; ``format_*`` give
the text the CLI prints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .config import ALL_OUTPUTS
from .errors import OutputPathError, RuntimeMissingError
from .load import write_file
from .records import NOT_A_TASK_METRIC, ValidationReport

__all__ = [
    "CompressionReport",
    "InspectionReport",
    "LayerReport",
    "ParameterShares",
    "TensorInfo",
    "format_inspection",
    "format_layers",
    "format_summary",
    "format_sweep",
    "format_tolerances",
    "format_validation",
    "layer_figure",
    "plot_layers",
    "plot_sweep",
    "sweep_figure",
    "write_json",
    "write_npz",
]


@dataclass(frozen=True)
class LayerReport:
    """One Conv/Gemm/MatMul of the model, compressed or not.

    ``groups``/``rank`` are None for a layer left dense; ``skipped_reason`` then says why.
    ``error_bound`` is the upper bound ``sqrt(Σ_i ‖W_i − Ŵ_i‖₂²)/‖W‖₂`` of the factors used
    (for the truncated SVD ``sqrt(Σ_i σ_{i,r+1}²)/‖W‖₂``; for calibrated, whitened factors the
    same sum over their residual) and ``error_actual`` the measured ``‖W − Ŵ‖₂/‖W‖₂``.

    With calibration data (calibrate.py), factorized layers also get relative output errors
    ``‖Ŷ − Y‖_F / ‖Y − Ȳ‖_F`` on that data: ``output_error_estimate`` from the whitened
    singular values, ``output_error`` measured for the layer alone (on its original inputs),
    and ``output_error_network`` measured inside the compressed model (errors of earlier
    layers included). They are None without calibration data.

    ``shared_with`` names the other nodes that read the same weight (discover.Layer.tied): the
    weight is factorized once for all of them, counted once in ``params_*``, and ``macs_*`` cover
    every use.

    ``latency_ms_before``/``latency_ms_after`` are the layer's measured latency dense and as
    chosen (latency.py; summed over its nodes), when candidates were timed.
    ``user_choice`` says when the user fixed the layer, and with which option: ``"excluded by
    the user (--exclude Gemm)"`` or ``"pinned by the user (--rank fc=8)"``; None otherwise.
    A layer without spectra (a recipe) has ``error_bound`` and ``error_actual`` None.
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
    shared_with: tuple[str, ...] = ()
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    user_choice: str | None = None


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as a user feeding the model sees it.

    Attributes:
        name: the tensor name.
        dtype: NumPy's name of the element type (``float32``, ``int64``), or the ONNX name for
            types NumPy lacks (``BFLOAT16``), or the kind of a non-tensor (``sequence``, ...).
        shape: one entry per dimension: its size, its symbolic name (``"batch"``), or ``"?"``
            when it is dynamic without a name; None when the rank is unknown.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None


@dataclass(frozen=True)
class ParameterShares:
    """Where a model's parameters are, by what onnx-lowrank can do with them.

    Attributes:
        total: every floating-point constant value (``cost.count_parameters``).
        compressible: weights of the layers ``discover`` finds compressible (a tied weight once).
        embeddings: constant 2-D tables read by ``Gather`` on axis 0 (token or position
            embeddings), not counted in ``compressible``.
    """

    total: int
    compressible: int
    embeddings: int

    @property
    def other(self) -> int:
        """Parameters in nothing compressible: biases, norms, skipped layers, other constants."""
        return self.total - self.compressible - self.embeddings

    def parts(self) -> list[tuple[str, int, float]]:
        """``(label, parameters, fraction of the total)`` of each part, as reports print them."""
        return [
            (label, value, value / self.total if self.total else 0.0)
            for label, value in (
                ("in compressible layers", self.compressible),
                ("in embeddings (Gather tables)", self.embeddings),
                ("in nothing compressible", self.other),
            )
        ]

    def to_dict(self) -> dict[str, Any]:
        shares = {"compressible": self.compressible, "embeddings": self.embeddings}
        shares["other"] = self.other
        fractions = {
            f"{key}_fraction": value / self.total if self.total else 0.0
            for key, value in shares.items()
        }
        return {"total": self.total, **shares, **fractions}


@dataclass
class InspectionReport:
    """What ``inspect`` found in a model.

    Attributes:
        source: where the model came from.
        params: the model's parameter count (``shares.total``).
        macs: MACs of its Conv/Gemm/MatMul nodes (per sample with a dynamic batch).
        layers: every Conv/Gemm/MatMul with a weight, compressible or with a skip reason.
        notes: shape assumptions and unknown MACs.
        inputs: the graph inputs to feed (initializers excluded).
        outputs: the graph outputs.
        opsets: imported opset version by domain (``""`` is the ONNX domain).
        ir_version: the model's IR version.
        shares: where the parameters are (compressible layers, embeddings, the rest).
    """

    source: str
    params: int
    macs: int | None  # None: a Conv/Gemm/MatMul's size depends on an unknown input size
    layers: list[LayerReport]
    notes: list[str] = field(default_factory=list)
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)
    ir_version: int = 0
    shares: ParameterShares | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shares"] = None if self.shares is None else self.shares.to_dict()
        return _plain(data)


@dataclass
class CompressionReport:
    """Everything a compression run did and measured.

    ``macs_before``/``macs_after`` are None when a Conv/Gemm/MatMul's MACs depend on an input
    size that is unknown (dynamic, and no ``--input-shape``, ``--inputs`` or
    ``--calibration`` gave it). ``validation_skipped`` says why validation did not run when it
    was asked for.
    """

    source: str
    version: str
    config: dict[str, Any]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
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
    #: Measured latency (pipeline._latency_summary): provider, device, the whole model's ms,
    #: predicted and measured ratios, and what timing the candidates took; None when untimed.
    latency: dict[str, Any] | None = None
    validation_skipped: str | None = None
    #: Where the input's parameters are (compressible layers, embeddings, the rest): what a
    #: budget fraction is a fraction of.
    shares: ParameterShares | None = None

    @property
    def compressed_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

    def plot(self, path: str | os.PathLike) -> Path:
        """Draw the per-layer parameters and errors into a PNG (see ``plot_layers``)."""
        return plot_layers(self, path)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["validation"] = None if self.validation is None else self.validation.to_dict()
        data["shares"] = None if self.shares is None else self.shares.to_dict()
        data["params_fraction"] = (
            self.params_after / self.params_before if self.params_before else 1.0
        )
        data["macs_fraction"] = (
            None
            if self.macs_before is None or self.macs_after is None
            else self.macs_after / self.macs_before
            if self.macs_before
            else 1.0
        )
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

    def dump(stream: BinaryIO) -> None:
        stream.write(json.dumps(data, indent=2).encode("utf-8") + b"\n")

    return write_file(target, dump, "report")


def write_npz(arrays: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write arrays keyed by name as an ``.npz`` archive, atomically."""
    target = Path(path)

    def dump(stream: BinaryIO) -> None:
        np.savez(stream, **arrays)

    return write_file(target, dump, "array file")


def _count(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


#: How a MAC count that depends on an unknown (dynamic) input size is printed.
UNKNOWN_MACS = "n/a (dynamic)"


def _macs(value: int | None) -> str:
    return UNKNOWN_MACS if value is None else _count(value)


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
            if timed:
                row += [_ms(layer.latency_ms_before), _ms(layer.latency_ms_after)]
        else:
            row += [_count(layer.params_before), _macs(layer.macs_before)]
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
            _count(report.params_before),
            _count(report.params_after),
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


#: What a sweep says when it cannot draw its plot.
NO_PLOT = "matplotlib is not installed; no plot written (pip install 'onnx-lowrank[plot]')"


#: What ``--plot`` says when matplotlib is missing.
NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'onnx-lowrank[plot]'"


def require_matplotlib() -> None:
    """Raise ``RuntimeMissingError`` unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeMissingError(NEEDS_MATPLOTLIB) from exc


#: ``skipped_reason`` of a layer that could be factorized but was left dense by the solver.
KEPT_DENSE = "kept dense by the allocation"

#: Most layer names written under the per-layer plot; beyond it every k-th one is.
MAX_LAYER_LABELS = 60


def layer_figure(report: CompressionReport):
    """A matplotlib ``Figure`` of a compression run, one x position per layer (graph order).

    Top: parameters of every layer before (outline) and after (filled: blue when factorized,
    grey when the allocation kept it dense, hatched when it cannot be factorized), on a log
    scale. Bottom: each factorized layer's error bound and measured weight error, and with
    calibration data its relative output error (the table's estimate, and the measured one when
    validation ran); the dashed line is the largest bound. Needs matplotlib
    (``require_matplotlib``).
    """
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = report.layers
    count = len(layers)
    figure = Figure(figsize=(min(24.0, max(9.0, 0.22 * count + 3)), 7.5), layout="constrained")
    columns = 4 if count >= 24 else 2  # legend entries per row
    top, bottom = figure.subplots(2, 1, sharex=True)
    positions = list(range(count))
    kinds = {
        "factorized": {"facecolor": "tab:blue"},
        "dense (allocation)": {"facecolor": "0.65"},
        "not factorizable": {"facecolor": "0.85", "hatch": "///", "edgecolor": "0.5"},
    }

    def kind(layer: LayerReport) -> str:
        if layer.rank is not None:
            return "factorized"
        return "dense (allocation)" if layer.skipped_reason == KEPT_DENSE else "not factorizable"

    top.bar(positions, [max(x.params_before, 1) for x in layers], 0.8, fill=False, edgecolor="0.4")
    for index, layer in enumerate(layers):
        top.bar(index, max(layer.params_after, 1), 0.56, linewidth=0, **kinds[kind(layer)])
    top.set_yscale("log")
    top.set_ylabel("parameters")
    handles = [Patch(fill=False, edgecolor="0.4", label="before")]
    present = {kind(layer) for layer in layers}
    handles += [
        Patch(label=f"after: {name}", **style) for name, style in kinds.items() if name in present
    ]
    legend = {"loc": "lower left", "bbox_to_anchor": (0, 1), "ncols": columns, "frameon": False}
    top.legend(handles=handles, **legend)
    kept = report.params_after / report.params_before if report.params_before else 1.0
    figure.suptitle(
        f"{Path(report.source).name}: {sum(x.rank is not None for x in layers)} of {count} "
        f"layers factorized, {kept:.1%} of the parameters kept "
        f"({_count(report.params_after)} of {_count(report.params_before)})"
    )
    series = [
        ("error bound", "error_bound", "o"),
        ("weight error (measured)", "error_actual", "x"),
        ("output error (estimate)", "output_error_estimate", "v"),
        ("output error (measured)", "output_error", "^"),
    ]
    largest = 0.0
    for label, attribute, marker in series:
        points = [
            (index, getattr(layer, attribute))
            for index, layer in enumerate(layers)
            if layer.rank is not None and getattr(layer, attribute) is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            bottom.plot(xs, ys, linestyle="none", marker=marker, label=label)
            largest = max(largest, *ys)
    if report.compressed_layers:
        bottom.axhline(
            report.max_error_bound, color="0.3", linestyle="--", linewidth=1, label="largest bound"
        )
        bottom.legend(**legend)
    bottom.set_ylabel("relative error")
    bottom.set_ylim(0, 1.12 * max(largest, report.max_error_bound) or 1.0)
    bottom.grid(alpha=0.3)
    step = max(1, math.ceil(count / MAX_LAYER_LABELS))
    bottom.set_xticks(positions[::step])
    bottom.set_xticklabels([_short(x.name) for x in layers[::step]], rotation=90, fontsize=7)
    bottom.set_xlim(-0.6, count - 0.4)
    return figure


def _short(name: str, keep: int = 28) -> str:
    return name if len(name) <= keep else "…" + name[-(keep - 1) :]


def plot_layers(report: CompressionReport, path: str | os.PathLike) -> Path:
    """Write ``layer_figure(report)`` to a PNG, atomically.

    Raises:
        RuntimeMissingError: matplotlib is not installed.
        OutputPathError: the file cannot be written.
    """
    return _save_figure(layer_figure(report), path)


def _save_figure(figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG through a temporary file in the target folder."""
    return write_file(
        Path(path), lambda stream: figure.savefig(stream, format="png", dpi=120), "plot"
    )


def plot_sweep(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike
) -> tuple[Path | None, str | None]:
    """Draw a sweep's trade-off curves into a PNG, atomically.

    Left: the largest layer error bound against the fraction of parameters kept, one line per
    method. Right, when the points were validated: the relative L2 error of the first output.
    Points that failed validation (no model written) carry a red X on both.

    Returns:
        ``(path, None)``, or ``(None, notice)`` when matplotlib is not installed.
    """
    try:
        figure = sweep_figure(rows)
    except RuntimeMissingError:
        return None, NO_PLOT
    return _save_figure(figure, path), None


def sweep_figure(rows: Sequence[dict[str, Any]]):
    """The matplotlib ``Figure`` of ``plot_sweep``.

    Raises:
        RuntimeMissingError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeMissingError(NO_PLOT) from exc
    validated = any(row["outputs"] for row in rows)
    figure = Figure(figsize=(11 if validated else 6, 4.2), layout="constrained")
    axes = figure.subplots(1, 2 if validated else 1, squeeze=False)[0]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    failed_label = "failed validation (not written)"
    for method in methods:
        points = sorted(
            (row for row in rows if row["method"] == method), key=lambda r: r["params_fraction"]
        )
        kept = [row["params_fraction"] for row in points]
        series = [[row["max_error_bound"] for row in points]]
        if validated:
            series.append(
                [
                    row["outputs"][0]["rel_l2_error"] if row["outputs"] else math.nan
                    for row in points
                ]
            )
        for axis, values in zip(axes, series, strict=True):
            axis.plot(kept, values, marker="o", label=method)
            failed = [
                (x, y)
                for x, y, row in zip(kept, values, points, strict=True)
                if row["validation_passed"] is False
            ]
            if failed:
                xs, ys = zip(*failed, strict=True)
                axis.plot(
                    xs,
                    ys,
                    linestyle="none",
                    marker="X",
                    markersize=11,
                    color="tab:red",
                    label=failed_label,
                )
    for axis in axes:  # one legend entry for the failed points, however many methods
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axis.legend(unique.values(), unique.keys())
    axes[0].set_ylabel("max layer error bound")
    axes[0].set_title("weight error")
    if validated:
        axes[1].set_ylabel(f"relative L2 error of {rows[0]['outputs'][0]['name']}")
        axes[1].set_title("output error (validation)")
    for axis in axes:
        axis.set_xlabel("fraction of parameters kept")
        axis.grid(alpha=0.3)
    return figure
