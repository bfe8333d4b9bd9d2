"""The ground floor, second room: records of what a run measured.

Calibration statistics and whitened factors (activations.py, whiten.py), output errors, the
validation verdict (validate.py), and the reports' records (per layer and whole model;
report.py prints them, plots.py draws them) are shared by several stages; like ``types``, this
module imports no stage. A report is plain data: ``to_dict`` gives the JSON of ``--report``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from .types import Factors, LayerSpectrum

__all__ = [
    "DAMPING",
    "FAR_COSINE",
    "KEPT_DENSE",
    "NOT_A_TASK_METRIC",
    "CalibratedLayer",
    "Calibration",
    "CompressionReport",
    "InspectionReport",
    "LatencyStats",
    "LayerLatency",
    "LayerReport",
    "LayerStatistics",
    "OutputComparison",
    "OutputErrors",
    "ParameterShares",
    "Side",
    "TensorInfo",
    "TimingStats",
    "ValidationReport",
    "plain",
]

Side = Literal["input", "output"]


#: Relative damping: ``λ = DAMPING · tr(Σ) / (c·κ)`` is added to the diagonal of ``Σ``.
DAMPING = 1e-6


@dataclass(frozen=True)
class LayerStatistics:
    """Statistics of one layer's input vectors over the calibration set.

    Attributes:
        name: layer name.
        side: ``"input"`` (``covariance`` is kept, and ``output_covariance`` for the group
            counts its blocks do not serve) or ``"output"`` (``output_covariance`` alone).
        count: number of input vectors seen (samples × output positions).
        mean: ``μ`` (``c·κ``).
        variance: the diagonal of ``Σ`` (``c·κ``).
        covariance: input side: ``Σ`` (``c·κ × c·κ``, channel-major like the folded weight),
            or its diagonal blocks ``Σ_i`` of ``b`` channel groups, ``(b, w, w)``, which serve
            the group counts that ``b`` divides (accumulate.py).
        output_covariance: group count ``g`` -> ``(g, f, f)``, the matrices ``W_i Σ_i W_iᵀ``
            of its groups.
        use_means: for a weight read by several nodes (``Layer.tied``): node name -> the mean
            ``μ_u`` of that node's input vectors. ``mean`` is then the pooled mean, and
            ``Σ`` the pooled covariance *within* the uses, ``Σ_u n_u/n · Σ_u``: each use gets
            its own bias correction, so differences between the uses' means cost nothing.
        row_weights: ``d`` (``f`` values, mean 1) of a table or classifier head, else None
            (see "Row weights" above).
        shrinkage: ``γ`` in ``[0, 1]``, the Ledoit–Wolf intensity with which whiten.py shrinks
            ``Σ`` toward its diagonal mean, ``(1 − γ)·Σ + γ·(tr Σ / c·κ)·I``, before whitening
            (``accumulate.ledoit_wolf``) where the vectors are few (``count ≤ c·κ``, per node
            for a tied weight), else 0.
            ``covariance`` and ``output_covariance`` are the unshrunk statistics.
    """

    name: str
    side: Side
    count: int
    mean: np.ndarray
    variance: np.ndarray
    covariance: np.ndarray | None = None
    output_covariance: Mapping[int, np.ndarray] | None = None
    use_means: Mapping[str, np.ndarray] = field(default_factory=dict)
    row_weights: np.ndarray | None = None
    shrinkage: float = 0.0

    @property
    def damping(self) -> float:
        """``λ = DAMPING · tr(Σ) / (c·κ)``; 1 when the inputs never vary (any λ > 0 works)."""
        scale = float(np.mean(self.variance)) if self.variance.size else 0.0
        return DAMPING * scale if scale > 0 else 1.0


@dataclass
class Calibration:
    """What ``analyze`` learns from the calibration set; independent of budget and method.

    Attributes:
        source: where the data came from (for reports).
        feeds: the calibration inputs, kept to measure output errors after compression.
        samples: number of calibration samples.
        statistics: layer name -> statistics of its input vectors.
        spectra: layer name -> singular values of every ``W_i S_i`` per group count.
        providers: ONNX Runtime execution providers used.
    """

    source: str
    feeds: dict[str, np.ndarray]
    samples: int
    statistics: dict[str, LayerStatistics]
    spectra: dict[str, LayerSpectrum]
    providers: list[str]


@dataclass(frozen=True)
class CalibratedLayer:
    """The whitened factors of one layer, and its bias correction.

    ``biases`` and ``shifts`` are keyed by node name: the layer's own, and those of its tied
    uses (``Layer.tied``), each corrected with its own input mean.

    Attributes:
        factors: ``U_i = A_r``, ``V_i = A_rᵀ W_i`` per group (rebalanced).
        biases: the corrected bias ``b' = b + α·(W − Ŵ) μ`` for the rewrite, or None to keep
            the original bias (no correction needed, or the bias is not a readable constant).
        shifts: ``α·(W − Ŵ) μ`` (output units) when the bias is corrected, zeros otherwise.
        output_error_estimate: ``ε_out(g, r)`` from the error table.
        error_bound: the weight-error bound of these factors,
            ``sqrt(Σ_i ‖W_i − Ŵ_i‖₂²) / ‖W‖₂`` (``factorize.relative_error_bound``); None
            until the pipeline computes it. The plain SVD's bound at the same ``(g, r)`` is
            smaller: whitened factors trade weight error for output error.
    """

    factors: Factors
    biases: Mapping[str, np.ndarray | None]
    shifts: Mapping[str, np.ndarray]
    output_error_estimate: float
    error_bound: float | None = None


@dataclass(frozen=True)
class OutputErrors:
    """Relative output errors of one compressed layer, measured on the calibration data.

    Both are ``‖Ŷ − Y‖_F / ‖Y − Ȳ‖_F``, with ``Y`` the original layer's output and ``Ȳ`` its
    per-channel mean.

    Attributes:
        local: ``Ŷ`` is the factorized layer applied to the original layer's inputs: the error
            this layer adds by itself (what ``ε_out`` estimates).
        network: ``Ŷ`` is the layer's output inside the compressed model, so the errors of the
            layers before it are included.
    """

    local: float
    network: float


#: An output whose cosine similarity with the original is below this gets a warning, tolerances
#: or not: the compressed model may be broken.
FAR_COSINE = 0.9


#: What the report says next to agreement measured on random inputs.
NOT_A_TASK_METRIC = (
    "agreement on random inputs is not a task metric; check the task on real inputs "
    "(--inputs FILE.npz)"
)


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the compressed model compares with the original.

    Attributes:
        name: the output's name.
        shape: its shape (the rows of every validation run together).
        max_abs_error, rel_l2_error, cosine_similarity: over every value where both models are
            finite.
        top1_agreement: fraction of positions whose argmax over the last axis agrees; None when
            the output has no class axis (``has_class_axis``).
        failures: every tolerance (or shape, NaN/Inf check) this output failed.
        top1_positions: how many positions ``top1_agreement`` counts.
        checked: the tolerances checked on this output, by field name, with their values.
        not_applicable: tolerances set for every output that cannot apply to this one (only
            ``min_top1``, on an output without a class axis).
    """

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    rel_l2_error: float
    cosine_similarity: float
    top1_agreement: float | None
    failures: tuple[str, ...] = ()
    top1_positions: int | None = None
    checked: Mapping[str, float] = field(default_factory=dict)
    not_applicable: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model over the timed runs, in milliseconds."""

    median_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> LatencyStats:
        return cls(statistics.median(times_ms), min(times_ms), max(times_ms))


@dataclass(frozen=True)
class ValidationReport:
    """Result of ``validate``.

    Attributes:
        provider: the ONNX Runtime execution provider used.
        inputs: where the inputs came from.
        outputs: one comparison per graph output.
        latency_ms_before: median latency of the original model, in milliseconds.
        latency_ms_after: median latency of the compressed model.
        failures: every reason the compressed model failed; empty when it passed.
        latency_batch: samples per latency run (None when the inputs were not split).
        latency_runs: timed pairs behind each median.
        tolerances: the tolerances checked (``max_rel_error``, ``min_cosine``, ``min_top1``
            that were set; a number for every output or a mapping per output). Without any,
            passing only means that the compressed model runs and its outputs have the
            original's shapes and no NaN/Inf where it has none.
        samples: samples validation ran (rows of the inputs' batch dimension).
        random_inputs: True when the inputs were random, not the user's (``--inputs``).
        latency_threads: intra-op threads of both sessions.
        latency_before, latency_after: median, min and max of each model's timed runs.
        latency_warmup: untimed pairs run before timing.
        rows_per_run: rows of the inputs per validation run after a first one-row run (None:
            the inputs ran whole).
    """

    provider: str
    inputs: str
    outputs: tuple[OutputComparison, ...] = ()
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    failures: tuple[str, ...] = field(default_factory=tuple)
    latency_batch: int | None = None
    latency_runs: int = 0
    tolerances: Mapping[str, float | Mapping[str, float]] = field(default_factory=dict)
    samples: int | None = None
    random_inputs: bool = False
    latency_threads: int | None = None
    latency_before: LatencyStats | None = None
    latency_after: LatencyStats | None = None
    latency_warmup: int = 0
    rows_per_run: int | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def far_outputs(self) -> list[OutputComparison]:
        """Outputs whose cosine similarity with the original is below ``FAR_COSINE``."""
        return [o for o in self.outputs if o.cosine_similarity < FAR_COSINE]

    @property
    def checked_on(self) -> dict[str, list[str]]:
        """The outputs each set tolerance was checked on, by field name."""
        return {
            name: [o.name for o in self.outputs if name in o.checked] for name in self.tolerances
        }

    @property
    def not_applicable(self) -> dict[str, list[str]]:
        """The outputs each tolerance set for every output could not apply to."""
        return {
            name: [o.name for o in self.outputs if name in o.not_applicable]
            for name in self.tolerances
            if any(name in o.not_applicable for o in self.outputs)
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["checked_on"] = self.checked_on
        data["not_applicable"] = self.not_applicable
        data["note"] = NOT_A_TASK_METRIC if self.random_inputs else None
        for item, output in zip(data["outputs"], self.outputs, strict=True):
            item["passed"] = output.passed
        return data


#: ``skipped_reason`` of a layer that could be factorized but was left dense by the solver.
KEPT_DENSE = "kept dense by the allocation"


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

    ``shared_with`` names the other nodes that read the same weight (types.Layer.tied): the
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
        return plain(data)


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
    #: Measured latency (speed.latency_summary): provider, device, the whole model's ms,
    #: predicted and measured ratios, and what timing the candidates took; None when untimed.
    latency: dict[str, Any] | None = None
    validation_skipped: str | None = None
    #: Where the input's parameters are (compressible layers, embeddings, the rest): what a
    #: budget fraction is a fraction of.
    shares: ParameterShares | None = None

    @property
    def compressed_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.rank is not None]

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
        return plain(data)


def plain(value: Any) -> Any:
    """JSON-ready: tuples to lists, non-finite floats to None."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class LayerLatency:
    """Measured latency of one layer's rows (summed over every node that reads its weight).

    Attributes:
        layer: layer name.
        dense_ms: the dense layer's time in ms.
        row_ms: time per candidate-table row (row 0 is the dense layer), timed or interpolated.
        timed: True for rows whose time was measured (or read from the cache), False for
            interpolated ones.
    """

    layer: str
    dense_ms: float
    row_ms: np.ndarray
    timed: np.ndarray


@dataclass
class TimingStats:
    """What measuring the cost tables took.

    Attributes:
        seconds: wall time spent building and timing sessions (cache reads included).
        measured: sessions timed in this run.
        cached: timings read from the cache.
        unknown: layers whose input shape is not fully known; their latency is not measured.
        provider: the execution provider timed.
        device: the CPU or GPU model.
        cache: the cache folder.
    """

    seconds: float = 0.0
    measured: int = 0
    cached: int = 0
    unknown: list[str] = field(default_factory=list)
    provider: str = ""
    device: str = ""
    cache: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
