"""Pictures of a compression run and of a sweep (``--plot``, ``sweep``), drawn with matplotlib
when it is installed (``pip install 'onnx-lowrank[plot]'``) and written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import RuntimeMissingError
from .records import KEPT_DENSE, CompressionReport, LayerReport
from .report import count_text
from .save import write_file

__all__ = [
    "NEEDS_MATPLOTLIB",
    "NO_PLOT",
    "layer_figure",
    "plot_layers",
    "plot_sweep",
    "require_matplotlib",
    "sweep_figure",
]

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
        f"({count_text(report.params_after)} of {count_text(report.params_before)})"
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
