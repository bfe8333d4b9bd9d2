"""compress(), sweep() and inspect(): the only place that knows the order of the stages.

    load ─▶ fold ─▶ discover ─▶ spectra [─▶ calibrate] ─▶ allocate ─▶ factorize ─▶ rewrite
         ─▶ validate ─▶ save

``analyze`` runs what does not depend on the budget (load to calibrate), ``choose`` the
allocation, ``realize`` the rest; ``compress`` runs them once, ``sweep`` runs ``analyze`` once
and the others per budget and method.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from . import calibrate, output_errors, refit, sensitivity, whiten
from .allocate import allocate, build_table, with_block, with_latency, without_rows
from .backend import get_backend, numpy_backend
from .choices import constrain_table, read_recipe, user_choices
from .config import CompressionConfig
from .cost import count_macs, count_parameters
from .device import preferred_multiple
from .discover import discover
from .errors import (
    ConfigError,
    InfeasibleBudgetError,
    NothingToCompressError,
    OutputPathError,
    ShapeError,
    ValidationFailedError,
)
from .factorize import factorize_with_error, relative_error, relative_error_bound
from .feeds import RANDOM_BATCH, graph_inputs, latency_feeds, unknown_dimensions
from .fold import fold
from .graphs import FLOAT_TYPES, attribute, type_name, walk_graphs
from .index import GraphIndex
from .latency import LatencyBook, measure_choice, measure_model
from .load import (
    LoadedModel,
    ModelSource,
    model_file_size,
    model_to_graph,
    open_model,
    source_path,
)
from .plots import plot_sweep
from .records import (
    KEPT_DENSE,
    CalibratedLayer,
    Calibration,
    CompressionReport,
    InspectionReport,
    LayerReport,
    OutputErrors,
    ParameterShares,
    TensorInfo,
)
from .report import write_json
from .rewrite import rewrite
from .save import (
    check_output_path,
    model_size_bytes,
    remove_stale_temporaries,
    save_model,
    temporary_prefix,
)
from .sessions import fixed_batch
from .shapes import infer_shapes
from .spectra import compute_spectra, error_table
from .types import (
    COST_KINDS,
    FOLDED_KEY,
    Analysis,
    BudgetLimit,
    CandidateTable,
    Discovery,
    Factors,
    GraphPath,
    Layer,
    LayerSpectrum,
    Progress,
    UserChoice,
    all_fixed,
)
from .validate import check_tolerances, providers_for, session_threads, validate, validation_inputs

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = [
    "CompressionResult",
    "SweepResult",
    "analyze",
    "candidate_tables",
    "choose",
    "compress",
    "embedding_tables",
    "group_limit",
    "inspect",
    "latency_book",
    "parameter_shares",
    "realize",
    "sweep",
    "sweep_row",
    "tensor_info",
]

log = logging.getLogger(__name__)


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
            force=bool(self.report.config.get("force")),  # the input failed the checker too
        )
        self.report.timings["save"] = time.perf_counter() - started
        self.report.size_bytes_after = model_file_size(written)
        return written

    def graph(self) -> gs.Graph:
        """The compressed model as a new ``onnx_graphsurgeon.Graph``, for pipelines that go on
        with their own graphsurgeon passes without writing a file. Weights that a lazily loaded
        model still reads from the input's external data files are read into the graph.

        Validation is not re-checked here: look at ``report.validation`` (``save`` refuses a
        model that failed it; a graph is handed out either way).
        """
        return model_to_graph(self.model, self.data_dir)


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
    layers = [_dense_record(layer, None) for layer in discovery.layers]
    layers += [_skipped_record(skipped) for skipped in discovery.skipped]
    shares = parameter_shares(model, discovery)
    return InspectionReport(
        source=_source_label(source),
        params=shares.total,
        macs=None if unknown else macs,
        layers=_in_graph_order(layers, model),
        notes=_shape_notes(discovery, unknown),
        inputs=[tensor_info(info) for info in graph_inputs(model)],
        outputs=[tensor_info(info) for info in model.graph.output],
        opsets={entry.domain: entry.version for entry in model.opset_import},
        ir_version=model.ir_version,
        shares=shares,
    )


def tensor_info(info: onnx.ValueInfoProto) -> TensorInfo:
    """Name, dtype and shape of a graph input or output (dynamic dimensions by name or ``?``)."""
    kind = info.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(info.name, (kind or "unknown").removesuffix("_type"), None)
    tensor = info.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, TypeError, ValueError):
        dtype = type_name(tensor.elem_type)
    if not tensor.HasField("shape"):
        return TensorInfo(info.name, dtype, None)
    shape: list[int | str] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        else:
            shape.append(dim.dim_param if dim.HasField("dim_param") and dim.dim_param else "?")
    return TensorInfo(info.name, dtype, tuple(shape))


def parameter_shares(model: onnx.ModelProto, discovery: Discovery) -> ParameterShares:
    """How many of the model's parameters are in compressible layers, in embeddings, and in
    nothing compressible.

    Embeddings are the tables of ``Gather`` layers (compressible too, but counted apart since
    users budget them differently) and any other ``embedding_tables`` that discovery skipped.
    A weight counts once, however many nodes read it.
    """
    weights = {(layer.graph_path, layer.weight_source) for layer in discovery.layers}
    tables = sum(size for key, size in embedding_tables(model).items() if key not in weights)
    gathers = sum(layer.params for layer in discovery.layers if layer.lookup)
    return ParameterShares(
        total=count_parameters(model),
        compressible=sum(layer.params for layer in discovery.layers) - gathers,
        embeddings=gathers + tables,
    )


def embedding_tables(model: onnx.ModelProto) -> dict[tuple[GraphPath, str], int]:
    """Constant 2-D floating-point tables read by ``Gather`` on axis 0, with their sizes.

    Keyed by ``(graph path, stored constant name)`` like ``Layer.weight_source``; tables reached
    through Identity/Cast/Transpose count once, at the constant that stores them.
    """
    tables: dict[tuple[GraphPath, str], int] = {}
    indexes: dict[GraphPath, GraphIndex] = {}
    for path, graph in walk_graphs(model.graph):
        parent = indexes.get(path[:-1]) if path else None
        index = indexes[path] = GraphIndex(graph, path, parent)
        for node in graph.node:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not node.input:
                continue
            ref = index.resolve(node.input[0])
            if isinstance(ref, str) or len(ref.shape) != 2:
                continue
            if attribute(node, "axis", 0) not in (0, -2) or ref.stored_dtype not in FLOAT_TYPES:
                continue
            tables[(ref.owner.path, ref.source)] = math.prod(ref.shape)
    return tables


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
    input_shapes, shape_note = _count_shapes(model, config, *given)
    original, params_model, notes = None, None, []
    if config.fold_batchnorm:
        with timer.stage("fold"):
            folding = fold(model, data_dir=loaded.data_dir)
        if folding.modified:
            original, model = model, folding.model
            notes.append(folding.summary())
    with timer.stage("discover"):
        discovery = discover(model, input_shapes, data_dir=loaded.data_dir)
        params_total = count_parameters(original or model)
        if original is not None:
            params_model = count_parameters(model)
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
    choices = user_choices(discovery, config, recipe)
    fixed = all_fixed(discovery, choices)
    # Random validation inputs are made before any heavy work, but after "nothing to
    # compress": a model without compressible layers needs no input shapes. Without sizes for
    # its dynamic dimensions, a parameter budget still compresses; validation is skipped.
    validation_skipped = None
    if config.validate and checked is None:
        random_shapes = {**_data_shapes(model, feeds, RANDOM_BATCH), **config.input_shapes}
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
        feeds, held_out = sensitivity.feeds_for(loaded.model, feeds, config)
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
            )
    network = None
    if held_out is not None:
        network = sensitivity.network_errors(
            discovery, held_out, calibration, backend, providers_for(config.device)
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
        validation_inputs=checked,
        original=original,
        params_model=params_model,
        notes=notes + ([shape_note] if shape_note else []),
        user_choices=choices,
        network=network,
        input_shapes=input_shapes,
        validation_skipped=validation_skipped,
    )


def _data_shapes(
    model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None, batch: int
) -> dict[str, tuple[int, ...]]:
    """Input shapes taken from data arrays (``--inputs``, ``--calibration``): each dynamic
    dimension gets the data's size, a dynamic leading one ``batch``; fixed ones stay."""
    shapes: dict[str, tuple[int, ...]] = {}
    for info in graph_inputs(model):
        array = None if arrays is None else arrays.get(info.name)
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in info.type.tensor_type.shape.dim
        ]
        if array is None or array.ndim != len(dims) or array.size == 0 or None not in dims:
            continue
        shapes[info.name] = tuple(
            fixed if fixed is not None else batch if axis == 0 else int(size)
            for axis, (fixed, size) in enumerate(zip(dims, array.shape, strict=True))
        )
    return shapes


def _count_shapes(
    model: onnx.ModelProto,
    config: CompressionConfig,
    inputs: Mapping[str, np.ndarray] | None,
    calibration: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Input shapes for MAC counts: ``--input-shape``, else those of the ``--inputs`` arrays,
    else those of the ``--calibration`` arrays (per sample: a dynamic batch is 1); and a note
    that says which data gave them."""
    shapes = dict(config.input_shapes)
    # only where the data says more than "batch 1": a dynamic dimension after the first
    unknown = {name.rpartition("[")[0] for name in unknown_dimensions(model, shapes)}
    taken = []
    for label, arrays in (("--inputs", inputs), ("--calibration", calibration)):
        for name, shape in _data_shapes(model, arrays, 1).items():
            if name in unknown and name not in shapes:
                shapes[name] = shape
                taken.append(f"{name} {'x'.join(map(str, shape))} (from {label})")
    if not taken:
        return shapes, None
    return shapes, "MACs counted at the input sizes of the data: " + ", ".join(taken)


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
    return _timed_tables(analysis, tables, config)


def latency_book(
    analysis: Analysis, config: CompressionConfig, progress: Progress | None = None
) -> LatencyBook:
    """The analysis's latency book, made on first use, with the whole model timed once."""
    if analysis.latency is None:
        started = time.perf_counter()
        providers = providers_for(config.device)
        threads = session_threads(config)
        book = LatencyBook(
            analysis.model, analysis.discovery, providers, progress=progress, threads=threads
        )
        reference = analysis.original or analysis.model
        try:
            feeds = (analysis.validation_inputs or validation_inputs(reference, config))[0]
            book.model_feeds = latency_feeds(reference, feeds)[1]
            analysis.latency_ms = measure_model(
                reference, book.model_feeds, providers, threads=threads
            )
        except Exception as exc:  # no inputs can be made, or the model does not run in ORT
            if config.latency is not None:
                raise ShapeError(
                    f"--latency times the whole model, which failed ({exc}); give concrete "
                    "input sizes with --input-shape NAME:D1,D2,... or real inputs with --inputs"
                ) from exc
            log.warning("cannot time the whole model (%s); only its layers are timed", exc)
        book.stats.seconds += time.perf_counter() - started
        analysis.latency = book
    return analysis.latency


def _timed_tables(
    analysis: Analysis, tables: list[CandidateTable], config: CompressionConfig
) -> list[CandidateTable]:
    """With a latency budget, every table gets its measured latency column (latency.py), and
    rows measured slower than their dense layer are dropped."""
    if config.latency is None:
        return tables
    book = latency_book(analysis, config)
    started = time.perf_counter()
    measured = book.grid(tables)
    analysis.timings["latency"] = analysis.timings.get("latency", 0.0) + (
        time.perf_counter() - started
    )
    return [
        with_latency(table, measured[table.layer].row_ms) if table.layer in measured else table
        for table in tables
    ]


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
        _require_macs(analysis.discovery, analysis.unknown_macs)
    _check_method_choices(analysis, config)
    budgets = _budgets(
        config,
        analysis.discovery,
        analysis.params_total,
        analysis.macs_total,
        params_model=analysis.params_model,
    )
    if config.latency is not None:
        budgets.append(_latency_budget(analysis, tables, config.latency))
        if _end_to_end(analysis):
            return _measured_latency(analysis, tables, budgets, config)
    choices = _allocate(analysis, tables, budgets, config)
    if config.latency is not None or not config.latency_check:
        return choices
    return _never_slower(analysis, tables, budgets, choices, config)


#: Re-solves of a latency budget on the measured end-to-end ratio, and the relative distance
#: to the target at which it stops.
_LATENCY_ROUNDS = 3
_LATENCY_TOLERANCE = 0.03
#: How far (relative) the fastest choice may measure above ``F`` before ``F`` is called
#: unreachable: end-to-end ratios on a loaded machine move by several per cent between calls.
_REACHABLE_TOLERANCE = 0.10


def _end_to_end(analysis: Analysis) -> bool:
    """Whether choices can be timed end to end (not for models whose weights stay on disk)."""
    loaded = analysis.loaded
    return bool(analysis.latency and analysis.latency_ms) and not (loaded and loaded.lazy)


def _measured_latency(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    config: CompressionConfig,
) -> list[int]:
    """Meet a latency budget on the measured end-to-end ratio, not only on the layer sum.

    The layers' times do not add up to the model's (fused activations, layout conversions
    between layers, memory traffic the one-layer models do not have: on EfficientNet-Lite0 the
    sum predicted 0.97 where the model measured 0.73), so choices are timed end to end: the
    original against the model with the chosen layers factorized (random factors,
    ``latency.measure_choice``), interleaved. First the fastest choice (every layer's
    fastest row): its measured ratio ``m_min`` is the smallest reachable fraction, and an ``F``
    with ``m_min > F·(1 + _REACHABLE_TOLERANCE)`` is an ``InfeasibleBudgetError`` naming it.
    Then the layer budget is solved for the predicted fraction ``p'`` that interpolates
    linearly between the nearest measured (predicted, measured) points below and above ``F``
    (at first the fastest choice and ``(1, 1)``, the dense model; regula falsi, so one noisy
    timing cannot send the next guess outside what has been measured), timed, and re-solved
    until ``m`` is within ``_LATENCY_TOLERANCE`` of ``F`` (relative), at most
    ``_LATENCY_ROUNDS`` times. The choice measured nearest ``F`` is kept.
    """
    started = time.perf_counter()
    target = config.latency
    fastest = [int(np.argmin(t.costs[:, 2])) for t in tables]
    floor = _predicted(analysis, tables, fastest)
    point = (floor, _measure_end_to_end(analysis, tables, fastest))
    # the fastest choice may break another budget (--params, --flops): then it is only a bound
    tried: list[tuple[float, list[int]]] = [(point[1], fastest)] if len(budgets) == 1 else []
    log.info("latency budget %.3g: fastest choice measured %.3f", target, point[1])
    if point[1] > target * (1 + _REACHABLE_TOLERANCE):
        smallest = math.ceil(point[1] * 1000) / 1000
        raise InfeasibleBudgetError(
            f"budget cannot be met: --latency {target:g} is below the smallest reachable "
            f"{smallest:.3f} (every layer at its fastest candidate, measured end to end); raise "
            "the budget, or allow more candidates (higher --max-groups, lower --rank-multiple)",
            {"latency": point[1]},
        )
    points = [point]
    for _ in range(_LATENCY_ROUNDS):
        if tried and abs(tried[-1][0] - target) <= _LATENCY_TOLERANCE * target:
            break
        # regula falsi: interpolate between the nearest measured points on either side of F,
        # (1, 1) (the dense model) and the fastest choice to start with; a noisy timing then
        # cannot throw the next guess outside what has been measured
        below = max((q for q in points if q[1] <= target), key=lambda q: q[1], default=None)
        above = min((q for q in points if q[1] > target), key=lambda q: q[1], default=(1.0, 1.0))
        if below is None or above[1] <= below[1]:
            break  # the fastest choice measured over F (within the reachable tolerance)
        share = (target - below[1]) / (above[1] - below[1])
        wanted = below[0] + share * (above[0] - below[0])
        fraction = min(max(wanted, floor * (1 + 1e-9)), 1.0)
        choices = _allocate_latency(analysis, tables, budgets, fraction, config)
        point = (
            _predicted(analysis, tables, choices),
            _measure_end_to_end(analysis, tables, choices),
        )
        points.append(point)
        tried.append((point[1], choices))
        log.info("latency budget %.3g: layer budget %.3g measured %.3f", target, fraction, point[1])
    if not tried:  # another budget refused every latency fraction tried
        raise InfeasibleBudgetError(
            f"budget cannot be met: --latency {target:g} together with the other budgets; "
            "raise one of them",
            {"latency": point[1]},
        )
    best = min(tried, key=lambda item: (abs(item[0] - target), item[0]))
    analysis.timings["latency"] = analysis.timings.get("latency", 0.0) + (
        time.perf_counter() - started
    )
    return best[1]


def _allocate_latency(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    fraction: float,
    config,
) -> list[int]:
    """Allocate with the latency budget (last) at ``fraction``. With other budgets, whose rows
    of least joint share may not fit a low latency fraction, the fraction moves halfway to 1
    until they do (at 1 the latency budget holds the dense model, which every budget allows)."""
    for _ in range(8):
        try:
            latency = replace(budgets[-1], fraction=fraction)
            return _allocate(analysis, tables, [*budgets[:-1], latency], config)
        except InfeasibleBudgetError:
            if len(budgets) == 1:
                raise
            fraction = (fraction + 1) / 2
    return _allocate(analysis, tables, budgets[:-1], config)


def _measure_end_to_end(
    analysis: Analysis, tables: list[CandidateTable], choices: list[int]
) -> float:
    """Measured latency ratio of the model with ``choices`` to the original."""
    book = analysis.latency
    picks = [
        (layer, int(table.groups[row]), int(table.ranks[row]))
        for layer, table, row in zip(analysis.discovery.layers, tables, choices, strict=True)
        if table.groups[row] > 0
    ]
    before, after = measure_choice(
        analysis.original or analysis.model,
        analysis.model,
        picks,
        book.model_feeds,
        book.providers,
        book.threads,
    )
    return after / before


def _predicted(analysis: Analysis, tables: list[CandidateTable], choices: list[int]) -> float:
    """``(T_model − Σ_ℓ T_ℓ(dense) + Σ_ℓ T_ℓ(x_ℓ)) / T_model`` from the latency column."""
    total = analysis.latency_ms or 1.0
    saved = sum(t.costs[0, 2] - t.costs[row, 2] for t, row in zip(tables, choices, strict=True))
    return 1 - saved / total


def _latency_budget(
    analysis: Analysis, tables: list[CandidateTable], fraction: float
) -> BudgetLimit:
    """``Σ_ℓ T_ℓ(x_ℓ) ≤ F·T_model − rest`` with ``rest = T_model − Σ_ℓ T_ℓ(dense)``."""
    total = analysis.latency_ms or 0.0
    book = analysis.latency
    dense = sum(  # row 0 is dense but in the one row of a layer the user pinned
        float(table.costs[0, 2])
        if table.groups[0] == 0 or book is None
        else book.dense_ms(table.layer)
        for table in tables
    )
    return BudgetLimit("latency", fraction, total, total - dense)


#: Candidates of one layer measured slower than dense before the never-slower check times the
#: layer's whole grid (latency.py) instead of dropping one group count's ranks at a time.
_STRIKES = 3


def _never_slower(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    choices: list[int],
    config: CompressionConfig,
) -> list[int]:
    """Re-solve until no chosen candidate is measured slower than its dense layer.

    Only the chosen candidates are timed (with their dense layers; cached on disk). When a
    layer's chosen ``(g, r)`` is slower, its rows with the same ``g`` and a rank ``≥ r`` are
    dropped (a larger rank of the same shape is not faster, see latency.py); at the
    ``_STRIKES``-th slower candidate of a layer, its grid is timed and every row measured or
    interpolated slower than dense is dropped (and the chosen row itself). Then the budget is
    solved again. Rows are dropped from ``tables`` in place, so ``realize`` and later sweep
    points see the same tables. Every round drops at least one row, so the loop ends. A budget
    that only slower candidates can meet is an ``InfeasibleBudgetError``.
    """
    book = latency_book(analysis, config)
    started = time.perf_counter()
    strikes: dict[str, int] = {}
    while True:
        chosen = {
            table.layer: (int(table.groups[row]), int(table.ranks[row]))
            for table, row in zip(tables, choices, strict=True)
            if table.groups[row] > 0
            and table.layer not in book.unknown
            and table.layer not in analysis.user_choices  # the user's choice stands
        }
        book.items({layer: [item] for layer, item in chosen.items()})
        slow = [
            index
            for index, table in enumerate(tables)
            if table.layer in chosen
            and book.timed[table.layer][chosen[table.layer]] > book.dense_ms(table.layer)
        ]
        if not slow:
            break
        for index in slow:
            table = tables[index]
            strikes[table.layer] = strikes.get(table.layer, 0) + 1
            groups, rank = chosen[table.layer]
            same = table.groups == groups
            if strikes[table.layer] < _STRIKES:
                tables[index] = without_rows(table, same & (table.ranks >= rank))
            else:  # the grid, and the chosen row whatever its interpolated time says
                table = with_latency(table, book.grid([table])[table.layer].row_ms)
                same = table.groups == groups
                tables[index] = without_rows(table, same & (table.ranks == rank))
        try:
            choices = _allocate(analysis, tables, budgets, config)
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(
                f"{exc} (candidates measured slower than their dense layer were dropped; "
                "--no-latency-check allows them)",
                exc.smallest_fraction,
            ) from exc
    analysis.timings["latency"] = analysis.timings.get("latency", 0.0) + (
        time.perf_counter() - started
    )
    return choices


def _allocate(
    analysis: Analysis,
    tables: list[CandidateTable],
    budgets: list[BudgetLimit],
    config: CompressionConfig,
) -> list[int]:
    """``allocate`` on the tables that leave a choice; a table of one row is a fixed cost.

    The budgets exclude every layer (``_budgets``), so each fixed layer's one row is added to
    their fixed part, and the method spends the rest on the other layers.
    """
    free = [index for index, table in enumerate(tables) if len(table) > 1]
    fixed = [index for index, table in enumerate(tables) if len(table) == 1]
    budgets = [
        replace(
            budget,
            fixed=budget.fixed
            + sum(float(tables[i].costs[0, COST_KINDS.index(budget.kind)]) for i in fixed),
        )
        for budget in budgets
    ]
    try:
        picked = allocate([tables[i] for i in free], budgets, config)
    except InfeasibleBudgetError as exc:
        if not analysis.user_choices:
            raise
        raise InfeasibleBudgetError(
            f"{exc}; the layers excluded or pinned by the user count at their fixed cost",
            exc.smallest_fraction,
        ) from exc
    choices = [0] * len(tables)
    for index, row in zip(free, picked, strict=True):
        choices[index] = row
    return choices


def _check_method_choices(analysis: Analysis, config: CompressionConfig) -> None:
    """Group counts pinned without a rank must be ones the method may choose."""
    for name, choice in analysis.user_choices.items():
        if choice.kind != "pinned" or choice.rank is not None or choice.groups is None:
            continue
        if config.method in ("energy", "svd") and choice.groups != 1:
            raise ConfigError(
                f"--method {config.method} factorizes with g = 1 only, but {choice.source} pins "
                f"{name!r} to {choice.groups} groups; pin its rank too, or use --method alds"
            )
        if config.method == "alds-error" and choice.groups > config.groups:
            raise ConfigError(
                f"--method alds-error uses at most --groups {config.groups} groups, but "
                f"{choice.source} asks for {choice.groups}; raise --groups or pin the rank too"
            )


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
    if analysis.network is not None:  # measured by candidate_tables, cached for every budget
        timer.timings["sensitivity"] = analysis.network.seconds
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
    if calibrated and config.refit:
        with timer.stage("refit"), numpy_backend(1).parallel():
            calibrated = refit.refit_layers(discovery, calibration, calibrated, progress)
            for name, item in calibrated.items():
                spectrum = analysis.spectra.get(name)
                weight = discovery.weight(discovery.layer(name))
                norm = None if spectrum is None else spectrum.spectral_norm
                error = None if norm is None else relative_error(weight, item.factors, norm)
                factors[name] = (item.factors, error)
    with timer.stage("rewrite"):
        biases = {  # by node name: a tied weight's nodes each have their own
            use: bias
            for item in (calibrated or {}).values()
            for use, bias in item.biases.items()
            if bias is not None
        }
        compressed = rewrite(
            model,
            [(discovery.layer(name), f) for name, (f, _) in factors.items()],
            biases=biases,
        )
        if analysis.params_model is not None:  # folded in this run: recorded for the next
            _record_folded(compressed, analysis)
    errors = {name: error for name, (_, error) in factors.items()}
    del factors  # the factors now live in the model; large models need the memory back
    with timer.stage("discover"):
        params_after = count_parameters(compressed)
        macs_after, unknown_after = count_macs(
            compressed, infer_shapes(compressed, analysis.input_shapes)
        )
    loaded = analysis.loaded or LoadedModel(model)
    spill, data_dir = None, loaded.data_dir
    if loaded.lazy:
        with timer.stage("rewrite"):
            spill, compressed = _spill(compressed, loaded, config.force)
            data_dir = Path(spill.name)
    validation = None
    if config.validate and analysis.validation_skipped is None:
        with timer.stage("validate"):
            validation = _validate(loaded, compressed, data_dir, config, analysis.validation_inputs)
        validation = _check_latency_ratio(validation, config)
    layers = _layer_records(
        discovery, tables, choices, analysis.spectra, errors, analysis.user_choices
    )
    latency = _latency_summary(analysis, tables, choices, validation)
    if latency is not None:
        layers = [_with_latency(layer, latency["layers"]) for layer in layers]
    if calibration is not None and calibrated:  # estimates always; measured ones with validate
        measured = {}
        if config.validate:
            with timer.stage("output-error"):
                measured = output_errors.measure_output_errors(
                    calibration,
                    discovery,
                    compressed,
                    calibrated,
                    progress,
                    compressed_dir=data_dir,
                )
        layers = [_with_output_errors(layer, calibrated, measured) for layer in layers]
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
        else {"file": calibration.source, "samples": calibration.samples},
        layers=_in_graph_order(layers, model),
        validation=validation,
        validation_skipped=analysis.validation_skipped if config.validate else None,
        timings=timer.timings,
        latency=None if latency is None else {k: v for k, v in latency.items() if k != "layers"},
        shares=parameter_shares(model, discovery),
        notes=analysis.notes
        + _shape_notes(discovery, analysis.unknown_macs)
        + _history_notes(analysis),
    )
    return CompressionResult(
        model=compressed,
        report=report,
        data_dir=data_dir,
        source_data_files=loaded.data_files,
        _spill=spill,
    )


def _check_latency_ratio(validation, config: CompressionConfig):
    """Add a failure when the compressed model measured more than ``--max-latency-ratio``
    times the original's latency."""
    if validation is None or config.max_latency_ratio is None:
        return validation
    before, after = validation.latency_ms_before, validation.latency_ms_after
    if not before or after is None or after / before <= config.max_latency_ratio:
        return validation
    failure = (
        f"latency {after:.3f} ms is {after / before:.2f}x the original's {before:.3f} ms "
        f"> --max-latency-ratio {config.max_latency_ratio:g}"
    )
    return replace(validation, failures=(*validation.failures, failure))


def _latency_summary(
    analysis: Analysis,
    tables: list[CandidateTable],
    choices: list[int],
    validation,
) -> dict[str, Any] | None:
    """Measured latencies for the report: per layer (dense, chosen), the whole model, the
    predicted ratio ``1 − Σ_ℓ (T_ℓ(dense) − T_ℓ(x_ℓ)) / T_model``, the ratio validation
    measured, and what measuring took. None when nothing was timed."""
    book = analysis.latency
    if book is None or not analysis.latency_ms:
        return None
    per_layer: dict[str, tuple[float, float]] = {}
    for table, row in zip(tables, choices, strict=True):
        dense = book.dense_ms(table.layer)
        if dense is None:
            continue
        item = (int(table.groups[row]), int(table.ranks[row]))
        chosen = book.timed[table.layer].get(item)
        if chosen is None:  # an interpolated grid row
            chosen = float(table.costs[row, 2]) if table.costs[row, 2] > 0 else None
        per_layer[table.layer] = (dense, dense if chosen is None else chosen)
    saved = sum(dense - chosen for dense, chosen in per_layer.values())
    measured = None
    if validation is not None and validation.latency_ms_before and validation.latency_ms_after:
        measured = validation.latency_ms_after / validation.latency_ms_before
    return {
        "provider": book.stats.provider,
        "device": book.stats.device,
        "model_ms": analysis.latency_ms,
        "predicted_ratio": 1 - saved / analysis.latency_ms,
        "measured_ratio": measured,
        "seconds": book.stats.seconds,
        "measured": book.stats.measured,
        "cached": book.stats.cached,
        "cache": book.stats.cache,
        "untimed_layers": list(book.unknown),
        "layers": per_layer,
    }


def _with_latency(layer: LayerReport, timed: dict[str, tuple[float, float]]) -> LayerReport:
    if layer.name not in timed:
        return layer
    dense, chosen = timed[layer.name]
    return replace(layer, latency_ms_before=dense, latency_ms_after=chosen)


def _record_folded(compressed: onnx.ModelProto, analysis: Analysis) -> None:
    """Record under ``FOLDED_KEY`` how many parameters folding removed, this run and earlier
    ones, so a later run budgets against the original model (the folded constants are gone
    from the model and from every factorized layer's record)."""
    removed = analysis.params_total - (analysis.params_model or analysis.params_total)
    total = analysis.discovery.folded_params + removed
    entry = next((p for p in compressed.metadata_props if p.key == FOLDED_KEY), None)
    if entry is None:
        entry = compressed.metadata_props.add()
        entry.key = FOLDED_KEY
    entry.value = str(total)


#: File name of the compressed model in the spill folder of a lazily loaded model.
_SPILLED = "compressed.onnx"

#: Spill folders are ``<temp>/onnx-lowrank-spill.<host>-<pid>.<random>``.
_SPILL_STEM = "onnx-lowrank-spill"


def _spill(
    compressed: onnx.ModelProto, loaded: LoadedModel, force: bool
) -> tuple[tempfile.TemporaryDirectory, onnx.ModelProto]:
    """Write the compressed model of a lazily loaded input to a temporary folder (external
    data) and load it back lazily, so its weights leave memory too. The folder lives as long
    as the ``CompressionResult`` that holds it; its name carries this process's id, so the next
    run removes it if this one is killed before it can."""
    folder = Path(tempfile.gettempdir())
    remove_stale_temporaries(folder, _SPILL_STEM)
    spill = tempfile.TemporaryDirectory(prefix=temporary_prefix(_SPILL_STEM), dir=folder)
    path = save_model(
        compressed,
        Path(spill.name) / _SPILLED,
        external_data=True,
        data_dir=loaded.data_dir,
        force=force,
    )
    return spill, open_model(path, check=False, lazy=True).model


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
    return validate(loaded.path, data_dir / _SPILLED, config, feeds, label, declared=loaded.model)


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
    timing = analysis.timings.get("latency", 0.0)
    choices = choose(analysis, tables, config)
    timing = analysis.timings.get("latency", 0.0) - timing  # the never-slower check's timing
    analysis.timings["allocate"] = time.perf_counter() - started - timing
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
        result = realize(analysis, tables, choices, point)
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


def group_limit(config: CompressionConfig, discovery: Discovery) -> int:
    """``config.max_groups``, or, when it is None (every divisor), the widest input channels."""
    if config.max_groups is not None:
        return config.max_groups
    return max((layer.in_channels for layer in discovery.layers), default=1)


def _require_macs(discovery: Discovery, unknown: list[str]) -> None:
    missing = [layer.name for layer in discovery.layers if layer.output_positions is None]
    missing += [name for name in unknown if name not in missing]
    if missing:
        raise ShapeError(
            f"--flops needs the MACs of every Conv/Gemm/MatMul, but {len(missing)} depend on "
            f"shapes that are unknown (e.g. {missing[0]}); give concrete input sizes with "
            "--input-shape NAME:D1,D2,..."
        )


def _budgets(
    config: CompressionConfig,
    discovery: Discovery,
    params_total: int,
    macs_total: int,
    *,
    params_model: int | None = None,
) -> list[BudgetLimit]:
    """Budgets on the compressible layers. ``params_total`` is the count of the model as
    loaded, ``params_model`` that of the (folded) model the layers are in, whose other
    parameters are the fixed part. A model compressed before by onnx-lowrank is budgeted as a
    fraction of its original model."""
    params_original = params_total + discovery.params_saved
    macs_original = macs_total + (discovery.macs_saved or 0)
    budgets = []
    if config.params is not None:
        present = params_total if params_model is None else params_model
        fixed = present - sum(layer.params for layer in discovery.layers)
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
        spectrum = spectra.get(layer.name)  # none for a recipe: the error is not measured
        norm = 0.0 if spectrum is None else spectrum.spectral_norm
        factors, error = factorize_with_error(weight, groups, rank, norm, backend)
        if spectrum is None:
            error = None
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
    calibration: Calibration,
    progress: Progress | None,
) -> tuple[dict[str, CalibratedLayer], dict[str, tuple[Factors, float]]]:
    """Whitened factors of the chosen layers, with their actual relative weight error and
    their error bound (``CalibratedLayer.error_bound``).

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
    calibrated = whiten.factorize_layers(calibration, discovery, chosen, progress)
    factors = _factorize(
        discovery, tables, plain_rows, analysis.spectra, analysis.backend, progress
    )
    for layer, _, _ in chosen:
        item = calibrated[layer.name]
        spectrum = analysis.spectra.get(layer.name)
        error = None
        if spectrum is not None:  # a recipe's fixed layers have no spectra
            weight = discovery.weight(layer)
            error = relative_error(weight, item.factors, spectrum.spectral_norm)
            # the plain SVD's bound does not hold for whitened factors: report theirs
            bound = relative_error_bound(weight, item.factors, spectrum.spectral_norm)
            calibrated[layer.name] = replace(item, error_bound=bound)
        factors[layer.name] = (item.factors, error)
    return calibrated, factors


def _with_output_errors(
    layer: LayerReport,
    calibrated: dict[str, CalibratedLayer],
    measured: dict[str, OutputErrors],
) -> LayerReport:
    if layer.name not in calibrated:
        return layer
    errors = measured.get(layer.name)
    item = calibrated[layer.name]
    return replace(
        layer,
        error_bound=layer.error_bound if item.error_bound is None else item.error_bound,
        output_error_estimate=item.output_error_estimate,
        output_error=None if errors is None else errors.local,
        output_error_network=None if errors is None else errors.network,
    )


def _layer_records(
    discovery: Discovery,
    tables: list[CandidateTable],
    choices: list[int],
    spectra: dict[str, LayerSpectrum],
    errors: dict[str, float | None],
    user: dict[str, UserChoice],
) -> list[LayerReport]:
    records = []
    for layer, table, row in zip(discovery.layers, tables, choices, strict=True):
        choice = user.get(layer.name)
        by_user = None if choice is None else choice.describe()
        if layer.name not in errors:
            if choice is not None and choice.kind == "excluded":
                reason = by_user
            elif len(table) == 1:
                reason = "no candidate saves weights under the candidate constraints"
            else:
                reason = KEPT_DENSE
            records.append(replace(_dense_record(layer, reason), user_choice=by_user))
            continue
        groups, rank = int(table.groups[row]), int(table.ranks[row])
        params = int(table.costs[row, 0])
        spectrum = spectra.get(layer.name)
        bound = (
            float(error_table(spectrum, groups, "bound")[rank])
            if spectrum is not None and groups in spectrum.singular_values
            else None
        )
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
                macs_after=_macs_after(layer, params, rank),
                error_bound=bound,
                error_actual=errors[layer.name],
                skipped_reason=None,
                shared_with=tuple(use.name for use in layer.tied),
                user_choice=by_user,
            )
        )
    records += [_skipped_record(skipped) for skipped in discovery.skipped]
    return records


def _macs_after(layer: Layer, params: int, rank: int) -> int | None:
    """MACs of the factorized layer with ``params`` weights (added biases included)."""
    positions = layer.mac_positions()
    if positions is None:
        return None
    return params * positions[0] + rank * layer.cols * positions[1]


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
        shared_with=tuple(use.name for use in layer.tied),
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
