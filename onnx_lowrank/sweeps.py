"""sweep(): one model compressed to several budgets with several methods, the analysis made
once (``pipeline.analyze``) and the stages after it run per point.

(Not ``sweep.py``: ``onnx_lowrank.sweep`` is the function, which would hide such a module.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CompressionConfig
from .errors import ConfigError, InfeasibleBudgetError, OutputPathError
from .load import ModelSource, source_path
from .pipeline import analyze, candidate_tables, choose, realize
from .plots import plot_sweep
from .records import CompressionReport
from .report import write_json
from .save import check_output_path
from .speed import latency_book
from .types import Progress

__all__ = ["SweepResult", "sweep", "sweep_row"]


@dataclass
class SweepResult:
    """What ``sweep`` wrote.

    Attributes:
        rows: one plain-data row per (budget, method), in the order solved (also in ``json``).
        json: the overall JSON file: source, config and every row.
        plot: the trade-off PNG, or None when matplotlib is not installed.
        notice: why there is no plot, or None.
    """

    rows: list[dict[str, Any]]
    json: Path
    plot: Path | None
    notice: str | None = None

    @property
    def passed(self) -> bool:
        """False when any point failed validation (its model was not written)."""
        return all(row["validation_passed"] is not False for row in self.rows)


def sweep(
    source: ModelSource,
    config: CompressionConfig,
    out_dir: str | os.PathLike,
    *,
    params: Sequence[float] = (),
    flops: Sequence[float] = (),
    methods: Sequence[str] | None = None,
    external_data: bool | None = None,
    progress: Progress | None = None,
    latency: Sequence[float] = (),
) -> SweepResult:
    """Compress one model to several budgets with several methods; spectra are computed once.

    Budget points: the fractions at one position of the given lists (``params``, ``flops``,
    ``latency``; lists given together must have the same length), which must all hold. For every
    point and method it writes ``<stem>.<method>.<budget>.onnx`` and
    ``<stem>.<method>.<budget>.json`` (a row: params, MACs, max layer error bound, validation
    metrics; plus the full report) into ``out_dir``, then ``sweep.json`` (every row) and
    ``sweep.png`` (error against kept parameters, one line per method) when matplotlib is
    installed. A point that fails validation gets its row and report but no model.

    Args:
        source: the model (path, bytes, ModelProto or onnx_graphsurgeon.Graph; never modified).
        config: every other option (error measure, constraints, validation); its own
            ``params``, ``flops`` and ``method`` are replaced per point.
        out_dir: folder for the outputs, created when missing.
        params: fractions of the parameters to keep.
        flops: fractions of the MACs to keep.
        latency: fractions of the measured latency to keep.
        methods: allocation methods (default: ``config.method``).
        external_data: store each model's weights in a ``.data`` file beside it (default: when
            the input had external data or a model exceeds 2 GiB).
        progress: optional callback ``(stage, done, total)``.

    Raises:
        InfeasibleBudgetError: a point cannot be met by a method; checked for every point
            before anything is written.
        ConfigError: no budget, lists of different lengths, or an unknown method.
    """
    points = _sweep_points(params, flops, latency)
    methods = list(methods or [config.method])
    configs = [
        config.replace(
            params=p,
            flops=f,
            latency=t,
            method=method,
            latency_check=True if t is not None else config.latency_check,
        )
        for p, f, t in points
        for method in methods
    ]
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"--out {folder} is a file; give a folder")
    stem = source_path(source).stem if source_path(source) is not None else "model"
    names = [f"{stem}.{point.method}.{_budget_label(point, short=True)}" for point in configs]
    files = [f"{name}{ext}" for name in names for ext in (".onnx", ".onnx.data", ".json")]
    for file in ("sweep.json", "sweep.png", *files) if folder.is_dir() else ():
        check_output_path(folder / file, "sweep output")  # not a device, FIFO or folder
    analysis = analyze(source, configs[0], progress=progress)
    # one set of tables for every point: timed for all when any point budgets latency
    timed = next((point for point in configs if point.latency is not None), configs[0])
    if timed.latency_check:
        latency_book(analysis, timed, progress)
    tables = candidate_tables(analysis, timed)
    chosen = []
    for point in configs:  # every point is solved before anything is written
        try:
            chosen.append(choose(analysis, tables, point))
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(
                f"sweep point {_budget_label(point)} with --method {point.method}: {exc}",
                exc.smallest_fraction,
            ) from exc
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    rows = []
    for done, (point, choices, name) in enumerate(zip(configs, chosen, names, strict=True)):
        last = done == len(configs) - 1  # the weights serve every point, then go
        result = realize(analysis, tables, choices, point, keep_weights=not last)
        row = sweep_row(result.report, point)
        if row["validation_passed"] is not False:
            result.save(folder / f"{name}.onnx", external_data=external_data)
            row["model"] = f"{name}.onnx"
        write_json({**row, "report": result.report.to_dict()}, folder / f"{name}.json")
        rows.append(row)
        if progress is not None:
            progress("sweep", done + 1, len(configs))
    overall = write_json(
        {"source": analysis.source, "config": config.to_dict(), "rows": rows},
        folder / "sweep.json",
    )
    plot, notice = plot_sweep(rows, folder / "sweep.png")
    return SweepResult(rows=rows, json=overall, plot=plot, notice=notice)


def sweep_row(report: CompressionReport, config: CompressionConfig) -> dict[str, Any]:
    """The summary of one sweep point as plain data."""
    validation = report.validation
    return {
        "method": config.method,
        "params": config.params,
        "flops": config.flops,
        "latency": config.latency,
        "params_after": report.params_after,
        "params_fraction": report.params_after / report.params_before,
        "macs_after": report.macs_after,
        "macs_fraction": report.macs_after / report.macs_before
        if report.macs_before and report.macs_after is not None
        else None,
        "max_error_bound": report.max_error_bound,
        "max_error_actual": report.max_error_actual,
        "layers_factorized": len(report.compressed_layers),
        "validation_passed": None if validation is None else validation.passed,
        "validation_failures": [] if validation is None else list(validation.failures),
        "validation_samples": None if validation is None else validation.samples,
        "validation_inputs": None
        if validation is None
        else ("random" if validation.random_inputs else "real"),
        "tolerances_checked": bool(validation is not None and validation.tolerances),
        "outputs": []
        if validation is None
        else [
            {
                "name": output.name,
                "max_abs_error": output.max_abs_error,
                "rel_l2_error": output.rel_l2_error,
                "cosine_similarity": output.cosine_similarity,
                "top1_agreement": output.top1_agreement,
                "checked": dict(output.checked),
                "passed": output.passed,
            }
            for output in validation.outputs
        ],
        "latency_ms_before": None if validation is None else validation.latency_ms_before,
        "latency_ms_after": None if validation is None else validation.latency_ms_after,
        "latency_threads": None if validation is None else validation.latency_threads,
        "latency_predicted": None if report.latency is None else report.latency["predicted_ratio"],
        "model": None,
    }


def _sweep_points(
    params: Sequence[float], flops: Sequence[float], latency: Sequence[float] = ()
) -> list[tuple[float | None, float | None, float | None]]:
    lists = {"params": list(params), "flops": list(flops), "latency": list(latency)}
    given = {flag: values for flag, values in lists.items() if values}
    if not given:
        raise ConfigError(
            "no budget given; pass --params F1,F2,..., --flops F1,F2,... and/or --latency F1,..."
        )
    lengths = {len(values) for values in given.values()}
    if len(lengths) > 1:
        counts = " and ".join(f"--{flag} {len(values)}" for flag, values in given.items())
        raise ConfigError(
            f"the budget lists have different lengths ({counts} fractions); give lists of the "
            "same length (the fractions at one position are one point where all hold), or one list"
        )
    count = lengths.pop()
    return [
        tuple(lists[flag][i] if lists[flag] else None for flag in lists)  # type: ignore[misc]
        for i in range(count)
    ]


def _budget_label(config: CompressionConfig, short: bool = False) -> str:
    parts = []
    for flag, value in (
        ("params", config.params),
        ("flops", config.flops),
        ("latency", config.latency),
    ):
        if value is not None:
            parts.append(f"{flag[0]}{value:g}" if short else f"--{flag} {value:g}")
    return ("_" if short else " ").join(parts)
