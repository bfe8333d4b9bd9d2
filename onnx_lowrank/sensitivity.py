r"""Network-aware error tables (``--error network``): what each candidate does to the outputs.

The per-layer measures (``bound``, ``max-group``, ``output``) compare layers by their own
error. The network does not fail one layer at a time, and not every layer's relative error
costs the same: a classifier's small relative output error can flip many decisions. Here the
error of a candidate ``(g, r)`` of layer ``ℓ`` is the degradation of the *network's outputs*
with only that layer replaced by its factors, measured in ONNX Runtime on a few held-out
samples (``--sensitivity-samples``, never the samples the layer statistics come from):

* a score output (2-D ``(batch, classes)``, floating) is compared by the mean KL divergence
  ``KL(p ‖ q)`` of the original's distribution ``p`` and the candidate's ``q`` per sample: the
  softmax of logits, or, when the original's values all lie in ``[0, 1]`` (softmax or sigmoid
  outputs), the values normalized to sum 1; plus ``TIE_BREAK`` (10⁻³) times the output's
  relative error, which orders candidates whose KL is at rounding level;
* any other floating output by its relative error ``‖Ŷ − Y‖_F / ‖Y‖_F``;

and a candidate's degradation is the sum over outputs.

**One probe model, and its suffixes.** The probe is the analysis model in which every
compressible layer's weight is an overridable initializer (a graph input with the original
weight as its default) and every node of it adds an overridable per-channel shift (default
zero). A candidate is measured by feeding its weight ``Ŵ`` (and, with calibration, its bias
correction ``α·(W − Ŵ) μ`` as the shift); every other layer keeps its default. The probe runs
once with its defaults (the reference outputs). Then each layer's candidates run only on the
layer's **suffix** (suffix.py): the nodes downstream of it, fed with the tensors they read from
upstream, which one run of the model computes once for all candidates of several layers. A
layer whose suffix cannot be built (tied weights, unknown shapes, cut tensors over
``suffix.CUT_BYTES``) is measured on the full probe, one forward pass per candidate.

**Which candidates are measured.** A layer's table has up to thousands of rows; measuring each
would cost as many forward passes. ``NetworkErrors.initial`` measures, per layer, the ``g = 1``
row and the row of least per-layer error at a few cost levels (``LEVELS``, fractions of the
dense layer's parameters). Every other row is interpolated (``interpolated``): in rank between
the measured ranks of the same ``g`` (with the full rank at zero), or, for a ``g`` not
measured, through the layer's measured relation between the per-layer error and the network
error. Errors never fall as the rank falls (a running maximum). Then ``refine`` solves the
allocation, measures the chosen rows that were only interpolated, and solves again, until
every chosen row is measured (at most ``REFINE_ROUNDS`` times). The measurements are cached in
the ``NetworkErrors`` object, so every budget of a sweep reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .allocate import without_rows
from .backend import Backend
from .config import CompressionConfig
from .data import load_npz
from .errors import CalibrationError, ConfigError
from .factorize import factorize, reconstruct
from .feeds import check_feeds, common_rows
from .graphs import FreshNames, overridable_initializers
from .index import GraphIndex
from .metrics import TIE_BREAK, degradation
from .output_errors import node_weight
from .records import Calibration
from .sessions import fixed_batch, make_session
from .suffix import CUT_BYTES, SuffixProbes
from .synthetic import synthetic_inputs
from .types import CandidateTable, Discovery, Factors, GraphPath, Layer, Progress
from .walk import graph_at
from .whiten import factorize_layers

if TYPE_CHECKING:
    from .types import Analysis

__all__ = [
    "LEVELS",
    "REFINE_ROUNDS",
    "SENSITIVITY_SAMPLES",
    "TIE_BREAK",
    "NetworkErrors",
    "calibration_subset",
    "degradation",
    "feeds_for",
    "holdout_indices",
    "interpolated",
    "network_errors",
    "network_tables",
    "probe_model",
    "split_feeds",
    "spread_indices",
]

log = logging.getLogger(__name__)

#: Fetches ``(factors, shifts)`` of a candidate: shifts by node name, in output units.
Approximation = Callable[[Layer, int, int], tuple[Factors, Mapping[str, np.ndarray]]]

#: Default number of held-out samples the degradations are measured on.
SENSITIVITY_SAMPLES = 32
#: Cost levels (fractions of the dense layer's parameters) measured per layer at first.
LEVELS: tuple[float, ...] = (0.04, 0.08, 0.15, 0.25, 0.4, 0.6, 0.8)
#: Most rounds of "solve, measure the interpolated rows chosen, solve again".
REFINE_ROUNDS = 4
#: Most samples per ONNX Runtime run.
MAX_BATCH = 64


def holdout_indices(samples: int, wanted: int, batch: int | None = None) -> np.ndarray:
    """Indices of the held-out samples: ``wanted`` evenly spaced ones, at most a quarter.

    With a fixed batch size the count is a multiple of it (at least one batch). Deterministic:
    the same file always gives the same split.
    """
    return spread_indices(samples, max(1, min(wanted, samples // 4)), batch)


def spread_indices(samples: int, count: int, batch: int | None = None) -> np.ndarray:
    """``count`` evenly spaced sample indices out of ``samples`` (whole batches of a fixed
    ``batch``, at least one); deterministic."""
    if batch:
        count = max(batch, count - count % batch)
        if count >= samples:
            raise ValueError(f"{samples} samples cannot spare {count} for sensitivity")
        # whole batches, evenly spaced
        starts = np.linspace(0, samples // batch - 1, count // batch).round().astype(int)
        return np.unique(np.concatenate([np.arange(s * batch, (s + 1) * batch) for s in starts]))
    return np.unique(np.linspace(0, samples - 1, count).round().astype(int))


def _shift_shape(use: Layer) -> tuple[int, ...]:
    """Shape of a per-channel shift of the output of ``use``'s node."""
    if use.op_type == "Conv":
        return (use.out_channels,) + (1,) * (len(use.weight_shape) - 2)
    if use.op_type == "Gather":  # a table's rows: its width
        return (use.cols,)
    return (use.out_channels,)


def probe_model(
    model: onnx.ModelProto, discovery: Discovery, layers: Sequence[Layer]
) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str]]:
    """A copy of ``model`` whose layers' weights and output shifts can be fed at run time.

    Every layer's weight becomes an initializer that is also a graph input (its default is the
    original weight, in the layout the node reads: one input per layout, so a table and its
    tied output MatMul get two); every node of the layer (tied uses too) gets
    ``Add(output, shift)`` with an overridable zero shift per output channel, and the Add
    takes over the node's output name, so everything downstream is unchanged. A node inside
    a subgraph (If branch, Loop or Scan body) reads its weight and shift from the main graph's
    inputs by outer-scope reference, and its Add sits in that subgraph.

    Returns:
        The probe, node name -> weight input name, and node name -> shift input name.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    names = FreshNames(probe)
    weights, shifts = {}, {}
    adds: dict[GraphPath, dict[int, onnx.NodeProto]] = {}  # per graph: node index -> its Add
    for layer in layers:
        base = f"{layer.name}/onnx_lowrank_probe"
        by_layout: dict[bool, str] = {}
        holder = graph_at(graph, layer.graph_path)
        for use in layer.uses():
            node = holder.node[use.node_index]
            stored, transposed = node_weight(use, node, discovery.weight(layer))
            if transposed not in by_layout:
                by_layout[transposed] = weight_name = names.fresh(f"{base}_weight")
                graph.initializer.append(onnx.numpy_helper.from_array(stored, weight_name))
                graph.input.append(
                    onnx.helper.make_tensor_value_info(weight_name, use.weight_dtype, stored.shape)
                )
            weights[use.name] = by_layout[transposed]
            node.input[0 if use.op_type == "Gather" else 1] = by_layout[transposed]
            shift_name = shifts[use.name] = names.fresh(f"{base}_shift")
            zeros = np.zeros(_shift_shape(use), dtype=stored.dtype)
            graph.initializer.append(onnx.numpy_helper.from_array(zeros, shift_name))
            graph.input.append(
                onnx.helper.make_tensor_value_info(shift_name, layer.weight_dtype, zeros.shape)
            )
            inner = names.fresh(f"{base}_output")
            output = node.output[0]
            node.output[0] = inner
            adds.setdefault(layer.graph_path, {})[use.node_index] = onnx.helper.make_node(
                "Add", [inner, shift_name], [output], name=names.fresh(f"{base}_add")
            )
    # deepest graphs first: a subgraph's node list changes, never the positions of the nodes
    # that hold it in its parent
    for path in sorted(adds, key=len, reverse=True):
        holder = graph_at(graph, path)
        nodes = []
        for index, node in enumerate(holder.node):  # each Add right after its node: sorted
            nodes.append(node)
            if index in adds[path]:
                nodes.append(adds[path][index])
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes, strict=True):
            copy.CopyFrom(node)
        del holder.node[:]
        holder.node.extend(copies)
    return probe, weights, shifts


class NetworkErrors:
    """Measured network degradations of candidates, cached across budgets.

    Args:
        discovery: the layers of the analysis model ``discovery.model``.
        feeds: the held-out samples (batch first) the degradations are measured on.
        approximation: ``(layer, groups, rank) -> (factors, shifts)``; ``shifts`` by node name
            (empty: no bias correction).
        providers: ONNX Runtime execution providers.
        batch: the model's fixed batch size, or None.
        cut_bytes: most bytes of a layer's cut tensors for a suffix run (``suffix.CUT_BYTES``;
            0: every candidate on the full probe).
    """

    def __init__(
        self,
        discovery: Discovery,
        feeds: Mapping[str, np.ndarray],
        approximation: Approximation,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        batch: int | None = None,
        cut_bytes: int = CUT_BYTES,
    ):
        self.discovery = discovery
        self.feeds = dict(feeds)
        self.approximation = approximation
        self.providers = list(providers)
        self.batch = batch
        # feeds that cannot be cut into samples (a scalar input) run whole, as one sample
        self._rows = common_rows(self.feeds)
        self.samples = self._rows or 1
        self.layers = list(discovery.layers)
        self.measured: dict[str, dict[tuple[int, int], float]] = {
            layer.name: {} for layer in self.layers
        }
        self.seconds = 0.0
        self.runs = 0
        self.cut_bytes = cut_bytes
        self.suffixes: SuffixProbes | None = None
        self._session = None
        self._reference: list[np.ndarray] | None = None
        self._weights: dict[str, str] = {}
        self._shifts: dict[str, str] = {}
        self._outputs: list[str] = []

    # -- ONNX Runtime -----------------------------------------------------------------------

    def _start(self) -> None:
        if self._session is not None:
            return
        started = time.perf_counter()
        probe, self._weights, self._shifts = probe_model(
            self.discovery.model, self.discovery, self.layers
        )
        self._session = make_session(probe, self.providers, data_dir=self.discovery.data_dir)
        self._outputs = [output.name for output in probe.graph.output]
        self._reference = self._run({})
        self.suffixes = SuffixProbes(
            probe, self.discovery, self._batches(), self._reference, self.providers, self.cut_bytes
        )
        # a warm pass, as the suffix runs it is compared with are: the first run of a session
        # also allocates and prepacks, and timed alone it made every suffix look cheaper
        begun = time.perf_counter()
        self._run({})
        self.suffixes.full_seconds = time.perf_counter() - begun
        self.seconds += time.perf_counter() - started

    def _batches(self) -> list[dict[str, np.ndarray]]:
        if self._rows is None:
            return [dict(self.feeds)]
        size = self.batch or MAX_BATCH
        return [
            {name: array[start : start + size] for name, array in self.feeds.items()}
            for start in range(0, self.samples, size)
        ]

    def _run(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Every output of the full probe on all held-out samples."""
        assert self._session is not None
        parts = [
            self._session.run(self._outputs, {**batch, **overrides}) for batch in self._batches()
        ]
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    # -- measurement ------------------------------------------------------------------------

    def measure(
        self, wanted: Mapping[str, Sequence[tuple[int, int]]], progress: Progress | None = None
    ) -> int:
        """Measure the ``(groups, rank)`` candidates of each layer not measured yet.

        Returns the number of new measurements.
        """
        todo = {
            name: sorted({c for c in candidates if c not in self.measured[name]})
            for name, candidates in wanted.items()
            if name in self.measured
        }
        total = sum(len(c) for c in todo.values())
        if not total:
            return 0
        self._start()
        assert self.suffixes is not None and self._reference is not None
        started = time.perf_counter()
        done = 0
        layers = {layer.name: layer for layer in self.layers if todo.get(layer.name)}
        # a layer's suffix starts at the nodes that read its probe weight and shift
        requests = [
            (name, {self._weights[u.name] for u in layer.uses()}
             | {self._shifts[u.name] for u in layer.uses()}, len(layer.uses()), len(todo[name]))
            for name, layer in layers.items()
        ]  # fmt: skip
        for name, runner in self.suffixes.runners(requests):
            layer, run = layers[name], runner or self._run
            holder = graph_at(self.discovery.model.graph, layer.graph_path)  # its node's graph
            for groups, rank in todo[layer.name]:
                factors, shifts = self.approximation(layer, groups, rank)
                approximate = reconstruct(factors)
                overrides = {}
                for use in layer.uses():
                    stored, _ = node_weight(use, holder.node[use.node_index], approximate)
                    overrides[self._weights[use.name]] = stored
                    shift = shifts.get(use.name)
                    if shift is not None and np.any(shift):
                        overrides[self._shifts[use.name]] = np.asarray(
                            shift, dtype=stored.dtype
                        ).reshape(_shift_shape(use))
                self.runs += 1
                value = degradation(self._reference, run(overrides))
                self.measured[layer.name][(groups, rank)] = value
                done += 1
                if progress is not None:
                    progress("sensitivity", done, total)
        self.seconds += time.perf_counter() - started
        log.info(
            "network errors: %d candidates measured in %.1f s (%d layers on the full probe, %d "
            "times as the cheaper way; cut tensors %.1f s, suffix sessions %.1f s)",
            total,
            self.seconds,
            len(self.suffixes.fallbacks),
            self.suffixes.in_full,
            self.suffixes.seconds["cut"],
            self.suffixes.seconds["build"],
        )
        return total

    def initial(self, tables: Sequence[CandidateTable], progress: Progress | None = None) -> None:
        """Measure, per layer, the ``g = 1`` row and the row of least per-layer error at each
        cost level of ``LEVELS`` (the cheapest row when none is that cheap)."""
        wanted: dict[str, list[tuple[int, int]]] = {}
        for table in tables:
            if table.layer not in self.measured or len(table) < 2:
                continue
            rows = np.arange(1, len(table))
            params = table.costs[rows, 0]
            picks = set()
            for level in LEVELS:
                fits = rows[params <= level * table.costs[0, 0]]
                if not fits.size:
                    fits = rows[params == params.min()]
                picks.add(int(fits[np.argmin(table.errors[fits])]))
                plain = fits[table.groups[fits] == 1]
                if plain.size:
                    picks.add(int(plain[np.argmax(table.ranks[plain])]))
            wanted[table.layer] = [(int(table.groups[r]), int(table.ranks[r])) for r in picks]
        self.measure(wanted, progress)

    @property
    def unreached(self) -> list[str]:
        """Layers inside subgraphs whose every measured candidate left the outputs exactly as
        they were: the held-out samples never run them (an If branch they do not take), so
        their network errors say nothing, and ``tables`` keeps them dense."""
        inside = {layer.name for layer in self.layers if layer.graph_path}
        return [
            name
            for name, points in self.measured.items()
            if name in inside and points and not any(points.values())
        ]

    def notes(self) -> list[str]:
        """The report's note on ``unreached`` layers, if any."""
        unreached = self.unreached
        if not unreached:
            return []
        return [
            f"{len(unreached)} layer(s) inside subgraphs (e.g. {unreached[0]}) kept dense: the "
            "held-out samples never run them (a branch not taken), so --error network cannot "
            "tell what cutting them costs; calibrate with data that runs them, or use --error "
            "output"
        ]

    def tables(self, tables: Sequence[CandidateTable]) -> list[CandidateTable]:
        """The tables with every row's error replaced by its (measured or interpolated)
        network degradation; layers never measured keep their errors, and ``unreached``
        layers keep only their dense row."""
        result = []
        unreached = set(self.unreached)
        for table in tables:
            points = self.measured.get(table.layer)
            if not points:
                result.append(table)
                continue
            if table.layer in unreached:
                result.append(without_rows(table, table.groups > 0))
                continue
            layer = self.discovery.layer(table.layer)
            result.append(replace(table, errors=interpolated(table, points, layer)))
        return result

    def refine(
        self,
        tables: Sequence[CandidateTable],
        solve: Callable[[list[CandidateTable]], list[int]],
        progress: Progress | None = None,
    ) -> list[CandidateTable]:
        """Solve, measure the chosen rows that were interpolated, and solve again."""
        current = self.tables(tables)
        for _ in range(REFINE_ROUNDS):
            choices = solve(current)
            wanted = {
                table.layer: [(int(table.groups[row]), int(table.ranks[row]))]
                for table, row in zip(tables, choices, strict=True)
                if row > 0
            }
            if not self.measure(wanted, progress):
                break
            current = self.tables(tables)
        return current


def interpolated(
    table: CandidateTable, points: Mapping[tuple[int, int], float], layer: Layer
) -> np.ndarray:
    """Network error of every row of ``table`` from the measured ``points``.

    Rows of a measured ``g``: linear in rank between its measured ranks, zero at the full
    rank ``min(f, c·κ/g)``, the lowest measured rank's value below it. Rows of other ``g``:
    through the layer's measured relation of per-layer error (``table.errors``) to network
    error, linear between the measured per-layer errors. Within each ``g`` the result never
    falls as the rank falls.
    """
    errors = np.zeros(len(table))
    proxy_of = {
        (int(g), int(r)): e for g, r, e in zip(table.groups, table.ranks, table.errors, strict=True)
    }
    pairs = sorted((proxy_of[key], value) for key, value in points.items() if key in proxy_of)
    proxies = np.asarray([p for p, _ in pairs] or [0.0])
    values = np.maximum.accumulate(np.asarray([v for _, v in pairs] or [0.0]))
    for g in np.unique(table.groups[table.groups > 0]):
        rows = np.flatnonzero(table.groups == g)
        ranks = table.ranks[rows]
        measured = sorted((r, v) for (gg, r), v in points.items() if gg == g)
        if measured:
            full = min(layer.out_channels, layer.cols // int(g))
            known_ranks = np.asarray([r for r, _ in measured] + [full], dtype=np.float64)
            known = np.asarray([v for _, v in measured] + [0.0])
            estimate = np.interp(ranks, known_ranks, known)
        else:
            estimate = np.interp(table.errors[rows], proxies, values)
        order = np.argsort(ranks)
        # never lower at a lower rank: running maximum from the highest rank down
        monotone = np.maximum.accumulate(estimate[order][::-1])[::-1]
        errors[rows[order]] = monotone
    for (g, r), value in points.items():  # measured rows keep their measurement
        hit = np.flatnonzero((table.groups == g) & (table.ranks == r))
        errors[hit] = np.maximum(errors[hit], value)
    return errors


def calibration_subset(
    feeds: Mapping[str, np.ndarray], count: int | None, batch: int | None
) -> dict[str, np.ndarray]:
    """``--calibration-samples``: ``count`` evenly spaced samples (all when ``count`` is None
    or not smaller than the file)."""
    samples = int(next(iter(feeds.values())).shape[0])
    if count is None or count >= samples:
        return dict(feeds)
    chosen = spread_indices(samples, count, batch)
    return {name: array[chosen] for name, array in feeds.items()}


def split_feeds(
    feeds: Mapping[str, np.ndarray], wanted: int, batch: int | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(statistics, held_out)``: the calibration samples for the layer statistics, and the
    ``holdout_indices`` ones for the network errors, disjoint."""
    samples = int(next(iter(feeds.values())).shape[0])
    held = holdout_indices(samples, wanted, batch)
    rest = np.setdiff1d(np.arange(samples), held)
    return (
        {name: array[rest] for name, array in feeds.items()},
        {name: array[held] for name, array in feeds.items()},
    )


def network_errors(
    discovery: Discovery,
    feeds: Mapping[str, np.ndarray],
    calibration: Calibration | None,
    backend: Backend,
    providers: Sequence[str],
) -> NetworkErrors:
    """The ``NetworkErrors`` of an analysis: calibrated candidates (whitened factors and bias
    correction, as ``realize`` makes them) when ``calibration`` is given, else data-free ones
    (truncated SVD of the weights)."""
    if calibration is not None:
        calibrated = {layer.name for layer in discovery.layers} & set(calibration.statistics)
        model = discovery.model
        index = GraphIndex(model.graph, overridable=overridable_initializers(model))

        def approximation(layer: Layer, groups: int, rank: int):
            if layer.name not in calibrated:
                return factorize(discovery.weight(layer), groups, rank, backend), {}
            made = factorize_layers(calibration, discovery, [(layer, groups, rank)], index=index)
            return made[layer.name].factors, made[layer.name].shifts

    else:

        def approximation(layer: Layer, groups: int, rank: int):
            return factorize(discovery.weight(layer), groups, rank, backend), {}

    return NetworkErrors(
        discovery, feeds, approximation, providers, batch=fixed_batch(discovery.model)
    )


def feeds_for(
    model: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray] | None,
    config: CompressionConfig,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
    """``(statistics feeds, held-out feeds)`` for ``--error network``.

    With calibration data, ``config.sensitivity_samples`` of its samples are held out
    (``split_feeds``). Without, the network errors are measured on ``config.inputs``, else on
    synthetic inputs (``synthetic.synthetic_inputs``: 1/f noise covering the classes the model
    predicts, run with ``providers``; ``data_dir``: the folder of a lazily loaded model's
    external data), and nothing is held out.

    Raises:
        CalibrationError: the calibration file has too few samples to hold some out.
    """
    wanted = config.sensitivity_samples
    batch = fixed_batch(model)
    if feeds is not None:
        samples = int(next(iter(feeds.values())).shape[0])
        if samples < 2 * (batch or 1):
            raise CalibrationError(
                f"--error network (the default with --calibration) holds calibration samples "
                f"out of the statistics, but {config.calibration} has only {samples}; give more "
                "samples, or use --error output"
            )
        return split_feeds(feeds, wanted, batch)
    if config.inputs is not None:
        given = load_npz(config.inputs)
        check_feeds(model, given, str(config.inputs))
        return None, given
    made = synthetic_inputs(
        model, config.input_shapes, wanted, config.seed, providers, data_dir, progress
    )
    return None, made


def network_tables(
    analysis: Analysis,
    config: CompressionConfig,
    candidate_tables: Callable[[Analysis, CompressionConfig], list[CandidateTable]],
    choose: Callable[[Analysis, list[CandidateTable], CompressionConfig], list[int]],
) -> list[CandidateTable]:
    """The candidate tables of ``--error network``, measured and refined for ``config``.

    The candidates are those of the per-layer measure (``output`` with calibration, else
    ``bound``), with the same costs (bias correction included); their errors become network
    degradations (``NetworkErrors``). With a budget, the rows the solver chooses are measured
    until every chosen row is (``NetworkErrors.refine``).
    """
    network = analysis.network
    if network is None:
        raise ConfigError("--error network needs an analysis made with --error network")
    calibrated = analysis.calibration is not None
    # the per-layer tables never read --inputs (a data-free network measure did, in analyze)
    proxy = config.replace(error="output" if calibrated else "bound", inputs=None)
    tables = candidate_tables(analysis, proxy)
    network.initial(tables)
    if not config.has_budget:
        return network.tables(tables)
    return network.refine(tables, lambda current: choose(analysis, current, config))
