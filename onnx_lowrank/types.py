"""The ground floor: the records every stage shares.

Stages (discover, spectra, allocate, calibrate, rewrite, …) import their records from here and
from ``records`` (measurements), never from each other's modules, so that no stage stands on
another for a type (docs/design.md, "Layout"). Nothing here imports a stage or a helper at run
time; the few annotations that name a stage's class are for type checkers only.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

if TYPE_CHECKING:
    from .backend import Backend
    from .latency import LatencyBook
    from .load import LoadedModel
    from .records import Calibration
    from .sensitivity import NetworkErrors

__all__ = [
    "COST_KINDS",
    "FACTORIZED_KEY",
    "FACTOR_TAG",
    "FOLDED_KEY",
    "Analysis",
    "BudgetLimit",
    "CandidateTable",
    "Discovery",
    "FactorizedLayer",
    "Factors",
    "GraphPath",
    "Layer",
    "LayerSpectrum",
    "Progress",
    "Shape",
    "ShapeInfo",
    "SkippedLayer",
    "TiedUse",
    "UserChoice",
    "all_fixed",
]

#: Where a subgraph sits: one step ``(node_index, attribute_name, position)`` per level below the
#: main graph (``position`` is 0 for a GRAPH attribute and the list index for GRAPHS). The main
#: graph is ``()``.
GraphPath = tuple[tuple[int, str, int], ...]

Shape = tuple[int | None, ...]


@dataclass(frozen=True)
class ShapeInfo:
    """Inferred shapes of a model's tensors.

    Attributes:
        shapes: tensor name -> shape, with None for an unknown dimension. Tensors whose rank is
            unknown are absent.
        assumed: human-readable notes of the assumptions made (a dynamic batch taken as 1).
        input_shapes: the concrete shapes used for graph inputs where they are fully known.
        types: tensor name -> ONNX element type, where inference found one.
    """

    shapes: dict[str, Shape] = field(default_factory=dict)
    assumed: tuple[str, ...] = ()
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)

    def get(self, name: str) -> Shape | None:
        return self.shapes.get(name)


#: Suffix of the node names rewrite.py gives to the two halves of a factorized pair. Layers that
#: carry it are never factorized again.
FACTOR_TAG = "/lowrank"


#: ``metadata_props`` key under which rewrite.py records the layers it factorized (JSON list).
FACTORIZED_KEY = "onnx_lowrank.factorized"


#: ``metadata_props`` key under which the pipeline records how many parameters folding
#: (fold.py) removed from the original model, in all runs so far (an integer).
FOLDED_KEY = "onnx_lowrank.folded_params"


@dataclass(frozen=True)
class TiedUse:
    """Another node that reads the same weight as a ``Layer`` (see ``Layer.tied``).

    Attributes:
        name: the node's layer name (unique, as ``discover`` names layers).
        node_index: its position in the layer's graph.
        input_rank: rank of its data input, or None when unknown.
        output_positions: its ``P`` (cost.py), or None when a shape is dynamic.
        op_type: its operator when it differs from the layer's (an output ``MatMul`` or
            ``Gemm`` tied with a ``Gather`` embedding table), else None.
        weight_input: the tensor it reads as its weight, when it differs from the layer's.
        weight_shape: that tensor's shape, when it differs from the layer's.
    """

    name: str
    node_index: int
    input_rank: int | None
    output_positions: int | None
    op_type: str | None = None
    weight_input: str | None = None
    weight_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Layer:
    """A compressible layer.

    A ``Gather`` layer is an embedding table ``T`` (``vocab × d``, a constant read by
    ``Gather(T, ids)`` on axis 0). Its folded weight is ``W = T``: the rows (``f = vocab``) are
    the outputs and ``c = d``, so the factors ``T ≈ U V`` give ``Gather(U, ids)`` followed by
    ``MatMul(·, V)``. ``P`` is then the number of ids looked up; the dense lookup costs no
    MACs and the factorized one ``r·d`` per id (``macs``, ``candidate_macs``).

    Attributes:
        name: unique layer name (the node name, or ``<op_type>_<index>`` when it has none).
        op_type: ``Conv``, ``Gemm``, ``MatMul`` or ``Gather``.
        node_index: position of the node in its graph's node list.
        weight_input: the tensor the node reads as its weight.
        weight_source: the initializer or Constant-node output that stores the weight.
        weight_shape: the weight's shape as the node reads it.
        weight_dtype: ONNX element type of the weight as the node reads it.
        out_channels: ``f``, rows of the folded weight.
        in_channels: ``c``, input channels (columns of the folded weight are ``c·κ``).
        kernel_shape: spatial kernel of a Conv, ``()`` for Gemm/MatMul.
        output_positions: ``P`` of cost.py, or None when a shape is dynamic.
        input_rank: rank of the data input, or None when unknown.
        max_groups: largest group count the rewrite supports for this layer (None: no limit).
        graph_path: the graph that holds the node (``()``: the main graph; see
            ``graphs.GraphPath``). The node's data input is ``node.input[0]`` of
            ``walk.graph_at(model.graph, graph_path).node[node_index]``.
        stored_dtype: element type of the stored constant when a ``Cast`` sits between it and
            the node (fp16 weights cast to fp32), else None.
        tied: the other nodes of the same graph that read the same weight, in graph order after
            this one. ``output_positions`` is then the sum over all uses, so MACs cover them
            all, while the weight counts once.
    """

    name: str
    op_type: str
    node_index: int
    weight_input: str
    weight_source: str
    weight_shape: tuple[int, ...]
    weight_dtype: int
    out_channels: int
    in_channels: int
    kernel_shape: tuple[int, ...]
    output_positions: int | None
    input_rank: int | None
    max_groups: int | None = None
    graph_path: GraphPath = ()
    stored_dtype: int | None = None
    tied: tuple[TiedUse, ...] = ()

    def uses(self) -> list[Layer]:
        """One view of the layer per node that reads its weight (itself first), each with that
        node's name, position and input rank: what the rewrite replaces."""
        own = self.output_positions
        if own is not None and self.tied:
            known = [t.output_positions for t in self.tied]
            own = None if None in known else own - sum(known)  # type: ignore[arg-type]
        views = [replace(self, output_positions=own, tied=())]
        for use in self.tied:
            views.append(
                replace(
                    self,
                    name=use.name,
                    op_type=use.op_type or self.op_type,
                    weight_input=use.weight_input or self.weight_input,
                    weight_shape=use.weight_shape or self.weight_shape,
                    node_index=use.node_index,
                    input_rank=use.input_rank,
                    output_positions=use.output_positions,
                    tied=(),
                )
            )
        return views

    @property
    def lookup(self) -> bool:
        """Whether a ``Gather`` reads the weight (an embedding table, maybe tied)."""
        return self.op_type == "Gather" or any(use.op_type == "Gather" for use in self.tied)

    def mac_positions(self) -> tuple[int, int] | None:
        """``(P of the Conv/Gemm/MatMul uses, ids looked up by the Gather uses)``, or None
        when a shape is dynamic."""
        if not self.lookup:
            positions = self.output_positions
            return None if positions is None else (positions, 0)
        dense = lookups = 0
        for use in self.uses():
            if use.output_positions is None:
                return None
            if use.op_type == "Gather":
                lookups += use.output_positions
            else:
                dense += use.output_positions
        return dense, lookups

    def candidate_macs(self, groups: int, rank: int) -> int | None:
        """MACs of the factorized layer: ``params(g, r)·P`` per Conv/Gemm/MatMul use and
        ``r·d`` per id looked up (the ``MatMul(·, V)`` after the ``Gather``); None when a
        shape is dynamic."""
        positions = self.mac_positions()
        if positions is None:
            return None
        dense, lookups = positions
        params = rank * (groups * self.out_channels + self.cols)
        return params * dense + rank * self.cols * lookups

    @property
    def kernel_size(self) -> int:
        """``κ``: taps of the kernel (1 for Gemm/MatMul)."""
        return math.prod(self.kernel_shape)

    @property
    def cols(self) -> int:
        """``c·κ``: columns of the folded weight."""
        return self.in_channels * self.kernel_size

    @property
    def params(self) -> int:
        """Weights of the dense layer, ``f·c·κ`` (bias excluded)."""
        return self.out_channels * self.cols

    @property
    def macs(self) -> int | None:
        """MACs of the dense layer, ``f·c·κ·P``, or None when ``P`` is unknown (a dense
        ``Gather`` costs none)."""
        if self.op_type == "Gather" and all(use.op_type == "Gather" for use in self.tied):
            return 0
        positions = self.mac_positions()
        return None if positions is None else self.params * positions[0]


@dataclass(frozen=True)
class SkippedLayer:
    """A Conv/Gemm/MatMul (or quantized or contrib variant) left as it is, and why."""

    name: str
    op_type: str
    reason: str
    weight_shape: tuple[int, ...] | None = None
    params: int = 0
    macs: int | None = None


@dataclass(frozen=True)
class FactorizedLayer:
    """A layer that an earlier run of onnx-lowrank factorized (from ``metadata_props``).

    Attributes:
        name: the layer's name at that run.
        params_dense: weights of the layer before that run, ``f·c·κ``.
        params: weights of its factorized pair now, ``r·(g·f + c·κ)``.
        output_positions: ``P`` of the pair, or None when a shape is dynamic.
        lookup_macs: MACs of the ``MatMul(·, V)`` after each factorized table lookup (a dense
            lookup costs none); those uses are not in ``output_positions``.
    """

    name: str
    params_dense: int
    params: int
    output_positions: int | None
    lookup_macs: int = 0

    @property
    def params_saved(self) -> int:
        return self.params_dense - self.params

    @property
    def macs_saved(self) -> int | None:
        if self.output_positions is None:
            return None
        return self.params_saved * self.output_positions - self.lookup_macs


@dataclass
class Discovery:
    """What ``discover`` found.

    Attributes:
        layers: the compressible layers, in graph order (main graph first, then subgraphs).
        skipped: every other Conv/Gemm/MatMul-like node, with the reason.
        shapes: inferred tensor shapes (subgraphs included).
        model: the model searched.
        data_dir: folder of the model file, for weights still in external files.
        factorized: layers an earlier run of onnx-lowrank factorized.
        folded_params: parameters that folding removed in earlier runs (``FOLDED_KEY``).
    """

    layers: list[Layer]
    skipped: list[SkippedLayer]
    shapes: ShapeInfo
    model: onnx.ModelProto = field(repr=False)
    data_dir: str | os.PathLike | None = None
    factorized: list[FactorizedLayer] = field(default_factory=list)
    folded_params: int = 0
    reader: Callable[[Layer], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def weight(self, layer: Layer) -> np.ndarray:
        """The folded float64 weight matrix ``W`` (``f × c·κ``) of ``layer`` (read by the
        ``reader`` that ``discover`` gives, which reads each weight once per run)."""
        if self.reader is None:
            raise ValueError("this Discovery has no weight reader; make it with discover()")
        return self.reader(layer)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def params_saved(self) -> int:
        """Weights that earlier runs of onnx-lowrank removed from this model (factorized
        layers and folded BatchNormalization/Mul/Add constants)."""
        return sum(record.params_saved for record in self.factorized) + self.folded_params

    @property
    def macs_saved(self) -> int | None:
        """MACs that earlier runs removed, or None when one of them is unknown."""
        saved = [record.macs_saved for record in self.factorized]
        return None if None in saved else sum(saved)  # type: ignore[arg-type]

    def skip_summary(self) -> str:
        """The most common skip reasons with their counts, e.g. ``"11 × grouped ..."``."""
        counts = Counter(skipped.reason for skipped in self.skipped)
        parts = [f"{count} × {reason}" for reason, count in counts.most_common(3)]
        if len(counts) > 3:
            parts.append(f"{len(counts) - 3} other reason(s)")
        return "; ".join(parts)


@dataclass(frozen=True)
class Factors:
    """The factors of one layer.

    Attributes:
        groups: ``g``.
        rank: ``r`` per group.
        first: ``(g, r, (c/g)·κ)``: ``V_i`` of every group, applied first.
        second: ``(f, g·r)``: ``[U_1 … U_g]``, applied second.
    """

    groups: int
    rank: int
    first: np.ndarray
    second: np.ndarray


@dataclass(frozen=True)
class LayerSpectrum:
    """Singular values of one layer for every candidate group count.

    Attributes:
        name: layer name.
        spectral_norm: ``‖W‖₂``, the largest singular value of the whole folded weight.
        frobenius_sq: ``‖W‖_F²``.
        singular_values: group count ``g`` -> array ``(g, k)`` of each group's singular values
            in descending order, ``k = min(f, c·κ/g)``.
    """

    name: str
    spectral_norm: float
    frobenius_sq: float
    singular_values: dict[int, np.ndarray]


#: Cost columns of every candidate table, in order. ``latency`` is in ms, measured per
#: candidate (latency.py), or 0 in every row when it was not measured.
COST_KINDS: tuple[str, ...] = ("params", "macs", "latency")


@dataclass(frozen=True)
class CandidateTable:
    """The candidates of one layer. Row 0 is the dense layer.

    Attributes:
        layer: layer name.
        groups: group count per row (0 for the dense row).
        ranks: rank per row (0 for the dense row).
        errors: relative layer error per row, in the configured measure.
        costs: ``(rows, 3)`` parameters, MACs and latency (ms) per row (MACs 0 when unknown,
            latency 0 when not measured).
        energy: removed Frobenius energy ``Σ_{i>r} σ_i² / ‖W‖_F²`` of ``g = 1`` rows (NaN for
            others, 0 for the dense row).
        full_rank: ``min(f, c·κ)``, the ``g = 1`` rank that reproduces ``W``.
    """

    layer: str
    groups: np.ndarray
    ranks: np.ndarray
    errors: np.ndarray
    costs: np.ndarray
    energy: np.ndarray
    full_rank: int

    def __len__(self) -> int:
        return len(self.groups)


@dataclass(frozen=True)
class BudgetLimit:
    """A whole-model budget on one cost kind.

    Attributes:
        kind: ``"params"``, ``"macs"`` or ``"latency"`` (ms).
        fraction: fraction of the whole model's count to keep.
        total: the whole model's count.
        fixed: the part of ``total`` outside the compressible layers' weights (biases, skipped
            layers, other constants), which no allocation changes.
    """

    kind: str
    fraction: float
    total: float
    fixed: float

    @property
    def limit(self) -> float:
        """What the compressible layers may cost together."""
        return self.fraction * self.total - self.fixed


@dataclass(frozen=True)
class UserChoice:
    """What the user fixed for one layer.

    Attributes:
        kind: ``"excluded"`` (kept dense) or ``"pinned"``.
        groups: the pinned group count (None: excluded).
        rank: the pinned rank, or None when the allocator chooses it among ``groups`` rows.
        source: the option that made the choice, for reports (``--exclude Gemm``).
    """

    kind: Literal["excluded", "pinned"]
    groups: int | None
    rank: int | None
    source: str

    @property
    def fixed(self) -> bool:
        """True when the choice leaves the allocator nothing to choose for the layer."""
        return self.kind == "excluded" or self.rank is not None

    def describe(self) -> str:
        """``excluded by the user (--exclude Gemm)``, ``pinned by the user (--rank fc=8)``,
        ``kept dense by --recipe FILE`` or ``pinned by --recipe FILE``."""
        if self.source.startswith("--recipe"):
            return f"{'kept dense' if self.kind == 'excluded' else 'pinned'} by {self.source}"
        return f"{self.kind} by the user ({self.source})"


#: ``progress(stage, done, total)`` is called as long stages advance.
Progress = Callable[[str, int, int], None]


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
        validation_inputs: the inputs validation will run on and their label, made and checked
            before any heavy work (None without validation).
        original: the model as loaded, before folding; validation compares against it. None
            when nothing was folded (then it is ``model``).
        params_model: parameters of ``model`` (after folding); None when it is ``params_total``.
        notes: what the analysis changed (folded nodes), for reports.
        latency: the layers' measured latencies (latency.py), made by ``latency_book`` when
            a run first needs them.
        latency_ms: the whole original model's measured latency, with ``latency``.
        user_choices: the layers the user excluded or pinned (``--exclude``, ``--rank``,
            ``--groups-for``, ``--recipe``), by layer name.
        network: with ``--error network``, the measured network errors (cached across
            budgets; sensitivity.py).
        input_shapes: the input shapes MACs are counted at (``--input-shape``, else those of
            the ``--inputs`` or ``--calibration`` data, per sample).
        validation_skipped: why validation will not run although it was asked for (dynamic
            input dimensions without sizes), else None.
        factors: the factors of ``(layer name, g, r)`` made so far in this run
            (layer_factors.py): ``(Factors, actual error)`` for plain truncated factors, a
            ``CalibratedLayer`` for whitened ones. The choices ``--latency`` times end to end
            and the final rewrite share them, so each ``(layer, g, r)`` is factorized once.
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
    calibration: Calibration | None = None
    validation_inputs: tuple[dict[str, np.ndarray], str] | None = None
    original: onnx.ModelProto | None = None
    params_model: int | None = None
    notes: list[str] = field(default_factory=list)
    latency: LatencyBook | None = None
    latency_ms: float | None = None
    user_choices: dict[str, UserChoice] = field(default_factory=dict)
    network: NetworkErrors | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    validation_skipped: str | None = None
    factors: dict[tuple[str, int, int], Any] = field(default_factory=dict)

    @property
    def fixed(self) -> bool:
        """True when the user fixed every layer: no spectra, no allocation (a recipe)."""
        return all_fixed(self.discovery, self.user_choices)


def all_fixed(discovery: Discovery, choices: dict[str, UserChoice]) -> bool:
    return all(layer.name in choices and choices[layer.name].fixed for layer in discovery.layers)
