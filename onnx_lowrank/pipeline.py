"""compress(), inspect() and the stages between: the only place that knows their order.

    load ─▶ fold ─▶ discover ─▶ spectra [─▶ calibrate] ─▶ allocate ─▶ factorize ─▶ rewrite
         ─▶ validate ─▶ save

``analyze`` runs what does not depend on the budget (load to calibrate), ``candidate_tables``
the error and cost tables, ``choose`` the allocation, ``realize`` the rest; ``compress`` runs
them once, ``sweeps.sweep`` runs ``analyze`` once and the others per budget and method.

The steps of a stage live in rooms of their own: ``budgets`` (budget limits and the input
sizes MACs are counted at), ``speed`` (latency budgets and the never-slower check),
``layer_factors`` (factors of the chosen layers), ``describe`` (the report's records) and
``result`` (``CompressionResult``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx

from . import calibrate, output_errors, refit, sensitivity, synthetic, whiten
from .allocate import build_table, with_block
from .backend import get_backend, numpy_backend
from .budgets import (
    budget_limits,
    check_method_choices,
    check_recompression,
    count_shapes,
    data_shapes,
    group_limit,
    require_macs,
)
from .choices import constrain_table, read_recipe, user_choices
from .config import CompressionConfig
from .cost import count_macs, count_parameters
from .describe import (
    dense_record,
    history_notes,
    in_graph_order,
    layer_records,
    parameter_shares,
    report_output_errors,
    shape_notes,
    skipped_record,
    tensor_info,
)
from .device import preferred_multiple
from .discover import discover
from .errors import ConfigError, NothingToCompressError
from .feeds import RANDOM_BATCH, graph_inputs, unknown_dimensions
from .fold import fold
from .layer_factors import choice_model, chosen_factors, with_errors
from .load import LoadedModel, ModelSource, model_file_size, open_model, source_path
from .records import CompressionReport, InspectionReport
from .result import SPILLED, CompressionResult, record_folded, spill
from .rewrite import rewrite
from .save import model_size_bytes
from .sessions import fixed_batch
from .shapes import infer_shapes
from .spectra import compute_spectra
from .speed import (
    allocate_rows,
    check_latency_ratio,
    end_to_end,
    latency_book,
    latency_budget,
    latency_summary,
    measured_latency,
    never_slower,
    report_latency,
    timed_tables,
)
from .types import Analysis, CandidateTable, Layer, LayerSpectrum, Progress, all_fixed
from .validate import check_tolerances, providers_for, validate, validation_inputs

__all__ = ["analyze", "candidate_tables", "choose", "compress", "inspect", "realize"]

log = logging.getLogger(__name__)


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
    """What a user needs to know to feed and compress a model.

    Its graph inputs and outputs (name, dtype, shape with dynamic dimensions named), opsets and
    IR version, every Conv/Gemm/MatMul with its shapes, parameters and MACs (and why any is
    skipped), and where the parameters are (``parameter_shares``).
    """
    config = config or CompressionConfig()
    loaded = open_model(source, force=config.force)
    model = loaded.model
    discovery = discover(model, config.input_shapes, data_dir=loaded.data_dir)
    macs, unknown = count_macs(model, discovery.shapes)
    layers = [dense_record(layer, None) for layer in discovery.layers]
    layers += [skipped_record(skipped) for skipped in discovery.skipped]
    shares = parameter_shares(model, discovery)
    return InspectionReport(
        source=_source_label(source),
        params=shares.total,
        macs=None if unknown else macs,
        layers=in_graph_order(layers, model),
        notes=shape_notes(discovery, unknown),
        inputs=[tensor_info(info) for info in graph_inputs(model)],
        outputs=[tensor_info(info) for info in model.graph.output],
        opsets={entry.domain: entry.version for entry in model.opset_import},
        ir_version=model.ir_version,
        shares=shares,
    )


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
    checked = None
    with timer.stage("load"):
        recipe = read_recipe(config.recipe) if config.recipe is not None else None
        loaded = open_model(source, force=config.force)
        model = loaded.model
        feeds = None
        if config.validate:  # tolerances name existing outputs, before any heavy work
            check_tolerances(model, config)
        if config.calibration is not None:  # checked before any heavy work
            feeds = calibrate.load_calibration(config.calibration, model)
            feeds = sensitivity.calibration_subset(
                feeds, config.calibration_samples, fixed_batch(model)
            )
        if config.validate and config.inputs is not None:
            checked = validation_inputs(model, config)
    given = (checked[0] if checked else None, feeds)
    input_shapes, shape_note = count_shapes(model, config, *given)
    original, params_model, notes = None, None, []
    if config.fold_batchnorm:
        with timer.stage("fold"):
            folding = fold(model, data_dir=loaded.data_dir)
        if folding.modified:
            original, model = model, folding.model
            notes.append(folding.summary())
    with timer.stage("discover"):
        # Calibration and the sensitivity probe read each weight in several stages, so the
        # reader keeps them; without them a factorized layer's weight is read twice (spectra,
        # factors), which costs less than keeping every float64 weight (docs/design.md, §8).
        reread = config.calibration is None and config.error != "network"
        discovery = discover(
            model, input_shapes, data_dir=loaded.data_dir, cache_bytes=0 if reread else None
        )
        params_total = count_parameters(original or model)
        if original is not None:
            params_model = count_parameters(model)
        macs_total, unknown_macs = count_macs(model, discovery.shapes)
    label = _source_label(source)
    if not discovery.layers and discovery.factorized:
        check_recompression(discovery, params_total, label, config)
    if not discovery.layers:
        raise NothingToCompressError(
            f"nothing to compress in {label}: no Conv/Gemm/MatMul with a constant weight can be "
            f"factorized ({len(discovery.skipped)} skipped: {discovery.skip_summary() or '-'}); "
            "run 'onnx-lowrank inspect' for every layer"
        )
    if config.flops is not None:
        require_macs(discovery, unknown_macs)
    choices = user_choices(discovery, config, recipe)
    fixed = all_fixed(discovery, choices)
    # Random validation inputs are made before any heavy work, but after "nothing to
    # compress": a model without compressible layers needs no input shapes. Without sizes for
    # its dynamic dimensions, a parameter budget still compresses; validation is skipped.
    validation_skipped = None
    if config.validate and checked is None:
        random_shapes = {**data_shapes(model, feeds, RANDOM_BATCH), **config.input_shapes}
        unknown = unknown_dimensions(loaded.model, random_shapes)
        if unknown:
            first = unknown[0].rpartition("[")[0]
            validation_skipped = (
                f"skipped: no size for the dynamic input dimension(s) {', '.join(unknown)}, so "
                f"there are no random inputs to validate on; give --input-shape {first}:D1,"
                "D2,... or --inputs FILE.npz to validate"
            )
            log.info("validation %s", validation_skipped)
        else:
            with timer.stage("load"):
                checked = validation_inputs(
                    loaded.model, config.replace(input_shapes=random_shapes)
                )
    backend = get_backend(config.device)
    spectra: dict[str, LayerSpectrum] = {}
    if not fixed:  # with every layer fixed (a recipe), nothing needs the spectra
        with timer.stage("spectra"):
            spectra = compute_spectra(discovery, group_limit(config, discovery), backend, progress)
    calibration, held_out = None, None
    if config.error == "network":  # held-out samples, never used for the layer statistics
        feeds, held_out = sensitivity.feeds_for(
            loaded.model, feeds, config, providers_for(config.device), discovery.data_dir, progress
        )
    if feeds is not None:
        limit = group_limit(config, discovery)
        if fixed:  # whitened spectra only of the pinned group counts (output error estimates)
            limit = max((c.groups or 1 for c in choices.values()), default=1)
        # one BLAS thread, as for the spectra (numpy statistics)
        with timer.stage("calibrate"), numpy_backend(1).parallel():
            calibration = calibrate.calibrate(
                discovery,
                feeds,
                limit,
                source=str(config.calibration),
                providers=providers_for(config.device),
                progress=progress,
                row_floor=config.row_floor,
                head_floor=config.head_floor,
                groups=calibrate.candidate_groups(discovery, limit, config.rank_multiple, choices),
                backend=backend,
            )
    network = None
    if held_out is not None:
        network = sensitivity.network_errors(
            discovery, held_out, calibration, backend, providers_for(config.device)
        )
        if calibration is None:  # data-free: say what the network errors were measured on
            notes.append(synthetic.measured_on(network.samples, config.inputs))
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
        validation_inputs=checked,
        original=original,
        params_model=params_model,
        notes=notes + ([shape_note] if shape_note else []),
        user_choices=choices,
        network=network,
        input_shapes=input_shapes,
        validation_skipped=validation_skipped,
    )


def candidate_tables(analysis: Analysis, config: CompressionConfig) -> list[CandidateTable]:
    """One candidate table per layer, for the error measure and constraints of ``config``,
    restricted by the user's choices (``choices.constrain_table``). A layer without spectra
    (every layer fixed, as with a recipe) gets the one row of its pinned ``(g, r)``, or dense."""
    if config.error == "network":
        return sensitivity.network_tables(analysis, config, candidate_tables, choose)
    output = config.error == "output"
    if output and analysis.calibration is None:
        raise ConfigError("--error output needs an analysis made with --calibration FILE.npz")
    discovery, spectra = analysis.discovery, analysis.spectra
    tables = [
        build_table(
            layer,
            spectra[layer.name],
            "bound" if output else config.error,
            group_limit(config, discovery),
            1 if config.rank_multiple == "auto" else config.rank_multiple,
        )
        if layer.name in spectra
        else _dense_table(layer)
        for layer in discovery.layers
    ]
    if config.rank_multiple == "auto":
        block = preferred_multiple(providers_for(config.device)[0])
        tables = [
            with_block(table, layer, block)
            for table, layer in zip(tables, discovery.layers, strict=True)
        ]
    if analysis.calibration is not None and spectra:
        # Layers inside subgraphs have no calibration statistics; they keep weight-error tables.
        whitened = analysis.calibration.spectra
        if output:
            tables = [
                whiten.with_output_errors(t, whitened[t.layer]) if t.layer in whitened else t
                for t in tables
            ]
        graph = analysis.model.graph
        tables = [  # bias correction adds a bias where there is none
            whiten.with_bias_cost(table, layer, graph) if layer.name in whitened else table
            for table, layer in zip(tables, discovery.layers, strict=True)
        ]
    choices = analysis.user_choices
    tables = [
        constrain_table(table, layer, choices[layer.name]) if layer.name in choices else table
        for table, layer in zip(tables, discovery.layers, strict=True)
    ]
    return timed_tables(analysis, tables, config)


def _dense_table(layer: Layer) -> CandidateTable:
    """The dense row alone: the table of a layer without spectra before the user's choice."""
    macs = layer.macs or 0
    return CandidateTable(
        layer=layer.name,
        groups=np.zeros(1, dtype=np.int64),
        ranks=np.zeros(1, dtype=np.int64),
        errors=np.zeros(1),
        costs=np.asarray([[layer.params, macs, 0.0]], dtype=np.float64),  # latency: unmeasured
        energy=np.zeros(1),
        full_rank=min(layer.out_channels, layer.cols),
    )


def choose(
    analysis: Analysis, tables: list[CandidateTable], config: CompressionConfig
) -> list[int]:
    """Row of each table chosen by ``config.method`` under the budgets of ``config``.

    A table of one row (an excluded or pinned layer, or one without a candidate that saves
    weights) leaves no choice: its cost is fixed, and the method allocates the rest of the
    budget among the other layers. When every layer is fixed (a recipe), nothing is allocated
    and the budget is not checked.
    """
    free = [index for index, table in enumerate(tables) if len(table) > 1]
    if not free and analysis.fixed:
        return [0] * len(tables)
    if not config.has_budget:
        raise ConfigError(
            "no budget given; pass --params F, --flops F and/or --latency F, e.g. --params 0.5"
        )
    if config.flops is not None:
        require_macs(analysis.discovery, analysis.unknown_macs)
    check_method_choices(analysis, config)
    budgets = budget_limits(
        config,
        analysis.discovery,
        analysis.params_total,
        analysis.macs_total,
        params_model=analysis.params_model,
    )
    if config.latency is not None:
        budgets.append(latency_budget(analysis, tables, config.latency))
        if end_to_end(analysis):
            return measured_latency(analysis, tables, budgets, config, choice_model)
    choices = allocate_rows(analysis, tables, budgets, config)
    if config.latency is not None or not config.latency_check:
        return choices
    return never_slower(analysis, tables, budgets, choices, config)


def realize(
    analysis: Analysis,
    tables: list[CandidateTable],
    choices: list[int],
    config: CompressionConfig,
    *,
    progress: Progress | None = None,
    keep_weights: bool = False,
) -> CompressionResult:
    """Factorize the chosen layers, rewrite the model, validate it, and report.

    Once the factors and the output errors are made, the weights the analysis read in float64
    (``discover.WeightReader``) are released before validation, unless ``keep_weights`` (a
    sweep realizes the same analysis again)."""
    timer = _Timer()
    timer.timings.update(analysis.timings)
    if analysis.network is not None:  # measured by candidate_tables, cached for every budget
        timer.timings["sensitivity"] = analysis.network.seconds
    discovery, model = analysis.discovery, analysis.model
    calibration = analysis.calibration
    with timer.stage("factorize"):  # those --latency timed are made already (layer_factors)
        calibrated, factors = chosen_factors(analysis, tables, choices, progress)
        if not keep_weights:
            analysis.factors.clear()
    refitted = 0
    if calibrated and config.refit:
        with timer.stage("refit"), numpy_backend(1).parallel():
            before = calibrated
            calibrated = refit.refit_layers(discovery, calibration, calibrated, progress)
            changed = {name: item for name, item in calibrated.items() if item is not before[name]}
            refitted = len(changed)
            bounded, refitted_factors = with_errors(analysis, changed)
            calibrated.update(bounded)
            factors.update(refitted_factors)
    with timer.stage("rewrite"):
        compressed = rewrite(
            model,
            [(discovery.layer(name), f) for name, (f, _) in factors.items()],
            biases=whiten.node_biases((calibrated or {}).values()),
        )
        if analysis.params_model is not None:  # folded in this run: recorded for the next
            record_folded(compressed, analysis)
    errors = {name: error for name, (_, error) in factors.items()}
    del factors  # the factors now live in the model; large models need the memory back
    with timer.stage("discover"):
        params_after = count_parameters(compressed)
        macs_after, unknown_after = count_macs(
            compressed, infer_shapes(compressed, analysis.input_shapes)
        )
    loaded = analysis.loaded or LoadedModel(model)
    spilled, data_dir = None, loaded.data_dir
    if loaded.lazy:
        with timer.stage("rewrite"):
            spilled, compressed = spill(compressed, loaded, config.force)
            data_dir = Path(spilled.name)
    measured = {}  # the layers' output errors on the calibration data
    if calibration is not None and calibrated and config.validate:
        with timer.stage("output-error"):
            measured = output_errors.measure_output_errors(
                calibration, discovery, compressed, calibrated, progress, compressed_dir=data_dir
            )
    if not keep_weights and discovery.reader is not None:
        discovery.reader.release()  # every weight is read: validation's peak goes without them
    validation = None
    if config.validate and analysis.validation_skipped is None:
        with timer.stage("validate"):
            validation = _validate(loaded, compressed, data_dir, config, analysis.validation_inputs)
        validation = check_latency_ratio(validation, config)
    layers = layer_records(
        discovery, tables, choices, analysis.spectra, errors, analysis.user_choices
    )
    latency = latency_summary(analysis, tables, choices, validation)
    if latency is not None:
        layers = [report_latency(layer, latency["layers"]) for layer in layers]
    if calibration is not None and calibrated:  # estimates always; measured ones with validate
        layers = [report_output_errors(layer, calibrated, measured) for layer in layers]
    factorized = [layer for layer in layers if layer.rank is not None]
    report = CompressionReport(
        source=analysis.source,
        version=_package_version(),
        config=config.to_dict(),
        params_before=analysis.params_total,
        params_after=params_after,
        # a total that leaves out nodes of unknown size is no total: reported as unknown
        macs_before=None if analysis.unknown_macs else analysis.macs_total,
        macs_after=None if analysis.unknown_macs or unknown_after else macs_after,
        size_bytes_before=analysis.size_bytes,
        size_bytes_after=model_size_bytes(compressed),
        max_error_bound=max((layer.error_bound or 0.0 for layer in factorized), default=0.0),
        max_error_actual=max((layer.error_actual or 0.0 for layer in factorized), default=0.0),
        max_output_error=None
        if calibration is None or not config.validate
        else max((layer.output_error or 0.0 for layer in factorized), default=0.0),
        calibration=None
        if calibration is None
        else {
            "file": calibration.source,
            "samples": calibration.samples,
            "refit": refitted > 0,  # whether the sequential refit changed any layer
            "refitted_layers": refitted,
        },
        layers=in_graph_order(layers, model),
        validation=validation,
        validation_skipped=analysis.validation_skipped if config.validate else None,
        timings=timer.timings,
        latency=None if latency is None else {k: v for k, v in latency.items() if k != "layers"},
        shares=parameter_shares(model, discovery),
        notes=analysis.notes
        + shape_notes(discovery, analysis.unknown_macs)
        + history_notes(analysis)
        + (analysis.network.notes() if analysis.network is not None else []),
    )
    return CompressionResult(
        model=compressed,
        report=report,
        data_dir=data_dir,
        source_data_files=loaded.data_files,
        _spill=spilled,
    )


def _validate(
    loaded: LoadedModel,
    compressed: onnx.ModelProto,
    data_dir: Path | None,
    config: CompressionConfig,
    inputs: tuple[dict[str, np.ndarray], str] | None,
):
    """Validate in ONNX Runtime; a model whose weights stay on disk is compared file to file
    (the original from its path, the compressed one from its spill folder), so neither is
    serialized in memory."""
    feeds, label = inputs or (None, None)
    if not loaded.lazy or loaded.path is None or data_dir is None:
        # ONNX Runtime reads the original from its file when there is one: serializing a
        # large ModelProto again costs as much as reading it.
        source = loaded.path or loaded.model
        return validate(source, compressed, config, feeds, label, declared=loaded.model)
    return validate(loaded.path, data_dir / SPILLED, config, feeds, label, declared=loaded.model)


def compress(
    source: ModelSource,
    config: CompressionConfig,
    *,
    progress: Progress | None = None,
) -> CompressionResult:
    """Compress a model to the budget of ``config``.

    Args:
        source: path to an ``.onnx`` file, its bytes, a ModelProto or an
            ``onnx_graphsurgeon.Graph`` (never modified).
        config: budget, method and options.
        progress: optional callback ``(stage, done, total)``.

    Returns:
        The compressed model and its report. When validation ran and failed, the report says
        why and ``CompressionResult.save`` refuses to write the model.

    Raises:
        NothingToCompressError: the model has no compressible layer.
        OnnxLowRankError: any other subclass, for bad input, options or budgets.
    """
    if not config.has_budget and not config.fixes_layers:
        raise ConfigError(
            "no budget given; pass --params F, --flops F and/or --latency F, e.g. --params 0.5"
        )
    analysis = analyze(source, config, progress=progress)
    if config.latency_check:  # made here so that timing the candidates shows a progress bar
        latency_book(analysis, config, progress)
    tables = candidate_tables(analysis, config)
    started = time.perf_counter()
    spent = sum(analysis.timings.values())
    choices = choose(analysis, tables, config)
    # less what choose recorded itself: the latency checks' timing, --latency's choice models
    spent = sum(analysis.timings.values()) - spent
    analysis.timings["allocate"] = time.perf_counter() - started - spent
    return realize(analysis, tables, choices, config, progress=progress)
