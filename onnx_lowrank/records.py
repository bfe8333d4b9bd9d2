"""The ground floor, second room: records of what a run measured.

Calibration statistics and whitened factors (calibrate.py), output errors, and the validation
verdict (validate.py) are shared by several stages and the reports; like ``types``, this
module imports no stage.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from .types import Factors, LayerSpectrum

__all__ = [
    "DAMPING",
    "FAR_COSINE",
    "NOT_A_TASK_METRIC",
    "CalibratedLayer",
    "Calibration",
    "LatencyStats",
    "LayerStatistics",
    "OutputComparison",
    "OutputErrors",
    "Side",
    "ValidationReport",
]

Side = Literal["input", "output"]


#: Relative damping: ``λ = DAMPING · tr(Σ) / (c·κ)`` is added to the diagonal of ``Σ``.
DAMPING = 1e-6


@dataclass(frozen=True)
class LayerStatistics:
    """Statistics of one layer's input vectors over the calibration set.

    Attributes:
        name: layer name.
        side: ``"input"`` (``covariance`` is kept) or ``"output"`` (``output_covariance``).
        count: number of input vectors seen (samples × output positions).
        mean: ``μ`` (``c·κ``).
        variance: the diagonal of ``Σ`` (``c·κ``).
        covariance: input side: ``Σ`` (``c·κ × c·κ``, channel-major like the folded weight).
        output_covariance: output side: group count ``g`` -> ``(g, f, f)``, the matrices
            ``W_i Σ_i W_iᵀ`` of its groups.
        use_means: for a weight read by several nodes (``Layer.tied``): node name -> the mean
            ``μ_u`` of that node's input vectors. ``mean`` is then the pooled mean, and
            ``Σ`` the pooled covariance *within* the uses, ``Σ_u n_u/n · Σ_u``: each use gets
            its own bias correction, so differences between the uses' means cost nothing.
        row_weights: ``d`` (``f`` values, mean 1) of a table or classifier head, else None
            (see "Row weights" above).
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
