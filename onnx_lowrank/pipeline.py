"""compress() and inspect(): the only place that knows the order of the stages.

load ─▶ discover ─▶ spectra ─▶ allocate ─▶ factorize ─▶ rewrite ─▶ validate ─▶ save
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx

from . import calibrate
from .allocate import BudgetLimit, CandidateTable, allocate, build_table
from .backend import Backend, get_backend
from .config import CompressionConfig
from .cost import count_macs, count_parameters, infer_shapes
from .discover import Discovery, Layer, discover
from .errors import (
    ConfigError,
    InfeasibleBudgetError,
    NothingToCompressError,
    ShapeError,
    ValidationFailedError,
)
from .factorize import Factors, factorize_with_error, relative_error
from .load import (
    LoadedModel,
    ModelSource,
    model_file_size,
    model_size_bytes,
    open_model,
    save_model,
    source_path,
)
from .report import CompressionReport, InspectionReport, LayerReport
from .rewrite import rewrite
from .spectra import LayerSpectrum, compute_spectra, error_table
from .validate import providers_for, validate

__all__ = [
    "Analysis",
    "CompressionResult",
    "Progress",
    "analyze",
    "candidate_tables",
    "choose",
    "compress",
    "inspect",
    "realize",
]

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)`` is called as long stages advance.
Progress = Callable[[str, int, int], None]


@dataclass
class CompressionResult:
    """The compressed model and the report of how it was made.

    Attributes:
        model: the compressed model.
        report: what was done and measured.
        data_dir: folder of the input model when ``model`` still reads weights from the input's
            external data files (models loaded lazily, see ``load.open_model``).
        source_data_files: the input's external data files; ``save`` never writes to them.
    """

    model: onnx.ModelProto
    report: CompressionReport
    data_dir: Path | None = None
    source_data_files: tuple[Path, ...] = ()
    _spill: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)

    def save(
        self, path: str | os.PathLike, *, external_data: bool | None = None, force: bool = False
    ) -> Path:
        """Write the model atomically.

        Args:
            path: the target ``.onnx`` file.
            external_data: store the weights in ``<path>.data``; None (default) does so when the
                input model had external data or the output exceeds 2 GiB.
            force: write even when validation failed.

        Raises:
            ValidationFailedError: the model failed validation and ``force`` is False.
            OutputPathError: the path cannot be written.
        """
        validation = self.report.validation
        if validation is not None and not validation.passed and not force:
            raise ValidationFailedError(
                "refusing to save a model that failed validation: "
                + "; ".join(validation.failures),
                validation,
            )
        started = time.perf_counter()
        if external_data is None:
            external_data = bool(self.source_data_files)
        written = save_model(
            self.model,
            path,
            external_data=external_data,
            data_dir=self.data_dir,
            protect=self.source_data_files,
        )
        self.report.timings["save"] = time.perf_counter() - started
        self.report.size_bytes_after = model_file_size(written)
        return written


def _package_version() -> str:
    try:
        return version("onnx-lowrank")
    except PackageNotFoundError:
        return "unknown"


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


def _source_label(source: ModelSource) -> str:
    path = source_path(source)
    return str(path) if path is not None else "<in-memory model>"


def _source_size(source: ModelSource, model: onnx.ModelProto) -> int:
    path = source_path(source)
    return model_file_size(path) if path is not None else model.ByteSize()


def inspect(source: ModelSource, config: CompressionConfig | None = None) -> InspectionReport:
    """List the model's layers, their shapes, parameters and MACs, and why any is skipped."""
    config = config or CompressionConfig()
    loaded = open_model(source, force=config.force)
    model = loaded.model
    discovery = discover(model, config.input_shapes, data_dir=loaded.data_dir)
    macs, unknown = count_macs(model, discovery.shapes)
    layers = [_dense_record(layer, None) for layer in discovery.layers]
    layers += [_skipped_record(skipped) for skipped in discovery.skipped]
    return InspectionReport(
        source=_source_label(source),
        params=count_parameters(model),
        macs=macs,
        layers=_in_graph_order(layers, model),
        notes=_shape_notes(discovery, unknown),
    )


@dataclass
class Analysis:
    """Everything about a model that does not depend on the budget or the method.

    ``analyze`` computes it once; ``candidate_tables``, ``allocate`` and ``realize`` then turn
    it into compressed models for any number of budgets (``compress`` does one).

    Attributes:
        source: a label of where the model came from.
        model: the loaded original model (owned by the pipeline; never modified).
        discovery: the compressible and skipped layers.
        spectra: singular values per layer and group count.
        params_total: the model's parameter count.
        macs_total: the model's MACs (Conv/Gemm/MatMul).
        unknown_macs: nodes whose MACs are unknown (dynamic shapes).
        size_bytes: size of the original model file(s).
        timings: seconds per stage so far.
        loaded: where the model came from and whether its weights are still on disk.
        calibration: activation statistics and whitened spectra when ``config.calibration``
            is given (calibrate.py), else None.
    """

    source: str
    model: onnx.ModelProto
    discovery: Discovery
    spectra: dict[str, LayerSpectrum]
    params_total: int
    macs_total: int
    unknown_macs: list[str]
    size_bytes: int
    backend: Backend
    timings: dict[str, float]
    loaded: LoadedModel | None = None
    calibration: calibrate.Calibration | None = None


def analyze(
    source: ModelSource, config: CompressionConfig, *, progress: Progress | None = None
) -> Analysis:
    """Load the model, discover its layers, and compute their spectra.

    With ``config.calibration``, the calibration file is checked right after loading, and the
    activation statistics and whitened spectra (calibrate.py) are computed last.

    Raises:
        NothingToCompressError: the model has no compressible layer.
        CalibrationError: the calibration file cannot be read or does not match the model.
        OnnxLowRankError: any other subclass, for bad input or options.
    """
    timer = _Timer()
    with timer.stage("load"):
        loaded = open_model(source, force=config.force)
        model = loaded.model
        feeds = None
        if config.calibration is not None:  # checked before any heavy work
            feeds = calibrate.load_calibration(config.calibration, model)
    with timer.stage("discover"):
        discovery = discover(model, config.input_shapes, data_dir=loaded.data_dir)
        params_total = count_parameters(model)
        macs_total, unknown_macs = count_macs(model, discovery.shapes)
    label = _source_label(source)
    if not discovery.layers and discovery.factorized:
        _check_recompression(discovery, params_total, label, config)
    if not discovery.layers:
        raise NothingToCompressError(
            f"nothing to compress in {label}: no Conv/Gemm/MatMul with a constant weight can be "
            f"factorized ({len(discovery.skipped)} skipped: {discovery.skip_summary() or '-'}); "
            "run 'onnx-lowrank inspect' for every layer"
        )
    if config.flops is not None:
        _require_macs(discovery, unknown_macs)
    backend = get_backend(config.device)
    with timer.stage("spectra"):
        spectra = compute_spectra(discovery, config.max_groups, backend, progress)
    calibration = None
    if feeds is not None:
        with timer.stage("calibrate"):
            calibration = calibrate.calibrate(
                discovery,
                feeds,
                config.max_groups,
                source=str(config.calibration),
                providers=providers_for(config.device),
                progress=progress,
            )
    return Analysis(
        source=label,
        model=model,
        discovery=discovery,
        spectra=spectra,
        params_total=params_total,
        macs_total=macs_total,
        unknown_macs=unknown_macs,
        size_bytes=_source_size(source, model),
        backend=backend,
        timings=timer.timings,
        loaded=loaded,
        calibration=calibration,
    )


def candidate_tables(analysis: Analysis, config: CompressionConfig) -> list[CandidateTable]:
    """One candidate table per layer, for the error measure and constraints of ``config``."""
    output = config.error == "output"
    if output and analysis.calibration is None:
        raise ConfigError("--error output needs an analysis made with --calibration FILE.npz")
    tables = [
        build_table(
            layer,
            analysis.spectra[layer.name],
            "bound" if output else config.error,
            config.max_groups,
            config.rank_multiple,
        )
        for layer in analysis.discovery.layers
    ]
    if analysis.calibration is None:
        return tables
    # Layers inside subgraphs have no calibration statistics; they keep weight-error tables.
    spectra = analysis.calibration.spectra
    if output:
        tables = [
            calibrate.with_output_errors(t, spectra[t.layer]) if t.layer in spectra else t
            for t in tables
        ]
    nodes = analysis.model.graph.node
    return [  # bias correction adds a bias where there is none
        calibrate.with_bias_cost(table, layer, nodes[layer.node_index])
        if layer.name in spectra
        else table
        for table, layer in zip(tables, analysis.discovery.layers, strict=True)
    ]


def choose(
    analysis: Analysis, tables: list[CandidateTable], config: CompressionConfig
) -> list[int]:
    """Row of each table chosen by ``config.method`` under the budgets of ``config``."""
    if not config.has_budget:
        raise ConfigError("no budget given; pass --params F and/or --flops F, e.g. --params 0.5")
    if config.flops is not None:
        _require_macs(analysis.discovery, analysis.unknown_macs)
    budgets = _budgets(config, analysis.discovery, analysis.params_total, analysis.macs_total)
    return allocate(tables, budgets, config)


def realize(
    analysis: Analysis,
    tables: list[CandidateTable],
    choices: list[int],
    config: CompressionConfig,
    *,
    progress: Progress | None = None,
) -> CompressionResult:
    """Factorize the chosen layers, rewrite the model, validate it, and report."""
    timer = _Timer()
    timer.timings.update(analysis.timings)
    discovery, model = analysis.discovery, analysis.model
    calibration, calibrated = analysis.calibration, None
    with timer.stage("factorize"):
        if calibration is None:
            factors = _factorize(
                discovery, tables, choices, analysis.spectra, analysis.backend, progress
            )
        else:
            calibrated, factors = _factorize_calibrated(
                analysis, tables, choices, calibration, progress
            )
    with timer.stage("rewrite"):
        biases = {
            name: item.bias for name, item in (calibrated or {}).items() if item.bias is not None
        }
        compressed = rewrite(
            model,
            [(discovery.layer(name), f) for name, (f, _) in factors.items()],
            biases=biases,
        )
    errors = {name: error for name, (_, error) in factors.items()}
    del factors  # the factors now live in the model; large models need the memory back
    with timer.stage("discover"):
        params_after = count_parameters(compressed)
        macs_after, _ = count_macs(compressed, infer_shapes(compressed, config.input_shapes))
    loaded = analysis.loaded or LoadedModel(model)
    spill, data_dir = None, loaded.data_dir
    if loaded.lazy:
        with timer.stage("rewrite"):
            spill, compressed = _spill(compressed, loaded)
            data_dir = Path(spill.name)
    validation = None
    if config.validate:
        with timer.stage("validate"):
            validation = _validate(loaded, compressed, data_dir, config)
    layers = _layer_records(discovery, tables, choices, analysis.spectra, errors)
    if calibration is not None and calibrated:  # estimates always; measured ones with validate
        measured = {}
        if config.validate:
            with timer.stage("output-error"):
                measured = calibrate.measure_output_errors(
                    calibration, discovery, compressed, calibrated, progress
                )
        layers = [_with_output_errors(layer, calibrated, measured) for layer in layers]
    factorized = [layer for layer in layers if layer.rank is not None]
    report = CompressionReport(
        source=analysis.source,
        version=_package_version(),
        config=config.to_dict(),
        params_before=analysis.params_total,
        params_after=params_after,
        macs_before=analysis.macs_total,
        macs_after=macs_after,
        size_bytes_before=analysis.size_bytes,
        size_bytes_after=model_size_bytes(compressed),
        max_error_bound=max((layer.error_bound or 0.0 for layer in factorized), default=0.0),
        max_error_actual=max((layer.error_actual or 0.0 for layer in factorized), default=0.0),
        max_output_error=None
        if calibration is None or not config.validate
        else max((layer.output_error or 0.0 for layer in factorized), default=0.0),
        calibration=None
        if calibration is None
        else {"file": calibration.source, "samples": calibration.samples},
        layers=_in_graph_order(layers, model),
        validation=validation,
        timings=timer.timings,
        notes=_shape_notes(discovery, analysis.unknown_macs) + _history_notes(analysis),
    )
    return CompressionResult(
        model=compressed,
        report=report,
        data_dir=data_dir,
        source_data_files=loaded.data_files,
        _spill=spill,
    )


#: File name of the compressed model in the spill folder of a lazily loaded model.
_SPILLED = "compressed.onnx"


def _spill(
    compressed: onnx.ModelProto, loaded: LoadedModel
) -> tuple[tempfile.TemporaryDirectory, onnx.ModelProto]:
    """Write the compressed model of a lazily loaded input to a temporary folder (external
    data) and load it back lazily, so its weights leave memory too. The folder lives as long
    as the ``CompressionResult`` that holds it."""
    spill = tempfile.TemporaryDirectory(prefix="onnx-lowrank-")
    path = save_model(
        compressed, Path(spill.name) / _SPILLED, external_data=True, data_dir=loaded.data_dir
    )
    return spill, open_model(path, check=False, lazy=True).model


def _validate(
    loaded: LoadedModel,
    compressed: onnx.ModelProto,
    data_dir: Path | None,
    config: CompressionConfig,
):
    """Validate in ONNX Runtime; a model whose weights stay on disk is compared file to file
    (the original from its path, the compressed one from its spill folder), so neither is
    serialized in memory."""
    if not loaded.lazy or loaded.path is None or data_dir is None:
        return validate(loaded.model, compressed, config)
    return validate(loaded.path, data_dir / _SPILLED, config)


def _history_notes(analysis: Analysis) -> list[str]:
    discovery = analysis.discovery
    if not discovery.factorized:
        return []
    original = analysis.params_total + discovery.params_saved
    return [
        f"the input was compressed before by onnx-lowrank ({len(discovery.factorized)} "
        f"factorized layer(s)); budgets are fractions of its original {original:,} parameters"
    ]


def compress(
    source: ModelSource,
    config: CompressionConfig,
    *,
    progress: Progress | None = None,
) -> CompressionResult:
    """Compress a model to the budget of ``config``.

    Args:
        source: path to an ``.onnx`` file, its bytes, or a ModelProto (never modified).
        config: budget, method and options.
        progress: optional callback ``(stage, done, total)``.

    Returns:
        The compressed model and its report. When validation ran and failed, the report says
        why and ``CompressionResult.save`` refuses to write the model.

    Raises:
        NothingToCompressError: the model has no compressible layer.
        OnnxLowRankError: any other subclass, for bad input, options or budgets.
    """
    if not config.has_budget:
        raise ConfigError("no budget given; pass --params F and/or --flops F, e.g. --params 0.5")
    analysis = analyze(source, config, progress=progress)
    tables = candidate_tables(analysis, config)
    started = time.perf_counter()
    choices = choose(analysis, tables, config)
    analysis.timings["allocate"] = time.perf_counter() - started
    return realize(analysis, tables, choices, config, progress=progress)


def _check_recompression(
    discovery: Discovery, params_total: int, label: str, config: CompressionConfig
) -> None:
    """A model whose every compressible layer an earlier run factorized: a no-op when the
    params budget is met (budgets are fractions of the original model), else infeasible."""
    original = params_total + discovery.params_saved
    fraction = params_total / original
    if config.params is not None and fraction > config.params * (1 + 1e-12):
        raise InfeasibleBudgetError(
            f"budget cannot be met: {label} was compressed by onnx-lowrank to {fraction:.3f} of "
            f"its original parameters and has no layer left to factorize; --params "
            f"{config.params:g} needs a run on the original model",
            {"params": fraction},
        )
    raise NothingToCompressError(
        f"nothing to do for {label}: every layer that can be factorized was factorized by an "
        f"earlier onnx-lowrank run ({len(discovery.factorized)} layer(s), {fraction:.3f} of the "
        "original parameters), and budgets are fractions of the original model"
    )


def _require_macs(discovery: Discovery, unknown: list[str]) -> None:
    missing = [layer.name for layer in discovery.layers if layer.output_positions is None]
    missing += [name for name in unknown if name not in missing]
    if missing:
        raise ShapeError(
            f"--flops needs every layer's output shape, but {len(missing)} are dynamic "
            f"(e.g. {missing[0]}); give concrete input sizes with --input-shape NAME:D1,D2,..."
        )


def _budgets(
    config: CompressionConfig, discovery: Discovery, params_total: int, macs_total: int
) -> list[BudgetLimit]:
    # A model compressed before by onnx-lowrank: budgets are fractions of the original model.
    params_original = params_total + discovery.params_saved
    macs_original = macs_total + (discovery.macs_saved or 0)
    budgets = []
    if config.params is not None:
        fixed = params_total - sum(layer.params for layer in discovery.layers)
        budgets.append(BudgetLimit("params", config.params, params_original, fixed))
    if config.flops is not None:
        fixed = macs_total - sum(layer.macs or 0 for layer in discovery.layers)
        budgets.append(BudgetLimit("macs", config.flops, macs_original, fixed))
    return budgets


def _factorize(
    discovery: Discovery,
    tables: list[CandidateTable],
    choices: list[int],
    spectra: dict[str, LayerSpectrum],
    backend,
    progress: Progress | None,
) -> dict[str, tuple[Factors, float]]:
    """Factors and actual relative error of every layer the allocation factorizes."""
    chosen = [
        (layer, table, row)
        for layer, table, row in zip(discovery.layers, tables, choices, strict=True)
        if table.groups[row] > 0
    ]

    def work(item: tuple[Layer, CandidateTable, int]) -> tuple[str, tuple[Factors, float]]:
        layer, table, row = item
        weight = discovery.weight(layer)
        groups, rank = int(table.groups[row]), int(table.ranks[row])
        norm = spectra[layer.name].spectral_norm
        factors, error = factorize_with_error(weight, groups, rank, norm, backend)
        if layer.weight_dtype == onnx.TensorProto.FLOAT and layer.stored_dtype is None:
            # the rewrite writes float32 anyway; holding float32 halves the factors' memory
            factors = dataclasses.replace(
                factors,
                first=factors.first.astype(np.float32),
                second=factors.second.astype(np.float32),
            )
        return layer.name, (factors, error)

    result: dict[str, tuple[Factors, float]] = {}
    for done, (name, value) in enumerate(backend.map(work, chosen)):  # layers in parallel
        result[name] = value
        if progress is not None:
            progress("factorize", done + 1, len(chosen))
    return result


def _factorize_calibrated(
    analysis: Analysis,
    tables: list[CandidateTable],
    choices: list[int],
    calibration: calibrate.Calibration,
    progress: Progress | None,
) -> tuple[dict[str, calibrate.CalibratedLayer], dict[str, tuple[Factors, float]]]:
    """Whitened factors of the chosen layers, with their actual relative weight error.

    Layers without calibration statistics (inside subgraphs) get plain factors.
    """
    discovery = analysis.discovery
    calibrated_rows = [
        (table, row) if table.layer in calibration.statistics else (table, 0)
        for table, row in zip(tables, choices, strict=True)
    ]
    plain_rows = [
        0 if table.layer in calibration.statistics else row
        for table, row in zip(tables, choices, strict=True)
    ]
    chosen = [
        (layer, int(table.groups[row]), int(table.ranks[row]))
        for layer, (table, row) in zip(discovery.layers, calibrated_rows, strict=True)
        if table.groups[row] > 0
    ]
    calibrated = calibrate.factorize_layers(calibration, discovery, chosen, progress)
    factors = _factorize(
        discovery, tables, plain_rows, analysis.spectra, analysis.backend, progress
    )
    for layer, _, _ in chosen:
        item = calibrated[layer.name]
        norm = analysis.spectra[layer.name].spectral_norm
        error = relative_error(discovery.weight(layer), item.factors, norm)
        factors[layer.name] = (item.factors, error)
    return calibrated, factors


def _with_output_errors(
    layer: LayerReport,
    calibrated: dict[str, calibrate.CalibratedLayer],
    measured: dict[str, calibrate.OutputErrors],
) -> LayerReport:
    if layer.name not in calibrated:
        return layer
    errors = measured.get(layer.name)
    return replace(
        layer,
        output_error_estimate=calibrated[layer.name].output_error_estimate,
        output_error=None if errors is None else errors.local,
        output_error_network=None if errors is None else errors.network,
    )


def _layer_records(
    discovery: Discovery,
    tables: list[CandidateTable],
    choices: list[int],
    spectra: dict[str, LayerSpectrum],
    errors: dict[str, float],
) -> list[LayerReport]:
    records = []
    for layer, table, row in zip(discovery.layers, tables, choices, strict=True):
        if layer.name not in errors:
            reason = (
                "no candidate saves weights under the candidate constraints"
                if len(table) == 1
                else "kept dense by the allocation"
            )
            records.append(_dense_record(layer, reason))
            continue
        groups, rank = int(table.groups[row]), int(table.ranks[row])
        params = int(table.costs[row, 0])
        bound = float(error_table(spectra[layer.name], groups, "bound")[rank])
        records.append(
            LayerReport(
                name=layer.name,
                op_type=layer.op_type,
                weight_shape=layer.weight_shape,
                groups=groups,
                rank=rank,
                params_before=layer.params,
                params_after=params,
                macs_before=layer.macs,
                macs_after=None
                if layer.output_positions is None
                else params * layer.output_positions,
                error_bound=bound,
                error_actual=errors[layer.name],
                skipped_reason=None,
            )
        )
    records += [_skipped_record(skipped) for skipped in discovery.skipped]
    return records


def _dense_record(layer: Layer, reason: str | None) -> LayerReport:
    return LayerReport(
        name=layer.name,
        op_type=layer.op_type,
        weight_shape=layer.weight_shape,
        groups=None,
        rank=None,
        params_before=layer.params,
        params_after=layer.params,
        macs_before=layer.macs,
        macs_after=layer.macs,
        error_bound=0.0,
        error_actual=0.0,
        skipped_reason=reason,
    )


def _skipped_record(skipped) -> LayerReport:
    return LayerReport(
        name=skipped.name,
        op_type=skipped.op_type,
        weight_shape=skipped.weight_shape,
        groups=None,
        rank=None,
        params_before=skipped.params,
        params_after=skipped.params,
        macs_before=skipped.macs,
        macs_after=skipped.macs,
        error_bound=None,
        error_actual=None,
        skipped_reason=skipped.reason,
    )


def _in_graph_order(layers: list[LayerReport], model: onnx.ModelProto) -> list[LayerReport]:
    order = {node.name or f"{node.op_type}_{i}": i for i, node in enumerate(model.graph.node)}
    return sorted(layers, key=lambda layer: order.get(layer.name, len(order)))


def _shape_notes(discovery: Discovery, unknown: list[str]) -> list[str]:
    notes = list(discovery.shapes.assumed)
    if unknown:
        notes.append(
            f"MACs unknown (dynamic shapes) for {len(unknown)} node(s): "
            + ", ".join(unknown[:5])
            + ("..." if len(unknown) > 5 else "")
        )
    return notes
