"""How one output of a compressed model compares with the original's: max absolute error,
relative L2 error, cosine similarity and top-1 agreement, accumulated run by run in float64
chunks, and the verdict of the tolerances a config sets (validate.py runs the models).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .config import TOLERANCES, CompressionConfig
from .errors import ConfigError
from .records import OutputComparison

__all__ = [
    "COMPARE_CHUNK",
    "TIE_BREAK",
    "OutputMetrics",
    "compare_output",
    "degradation",
    "has_class_axis",
    "is_scores",
    "names_output",
]

#: Values compared per float64 chunk.
COMPARE_CHUNK = 2**20


def has_class_axis(shape: Sequence[int | None], floating: bool) -> bool | None:
    """Whether an output of this shape and type has a class axis for top-1 agreement: floating
    point, at least two dimensions, the last of size two or more. None when the shape leaves it
    open (a dynamic last dimension)."""
    if not floating or len(shape) < 2:
        return False
    if shape[-1] is None:
        return None
    return shape[-1] >= 2


class OutputMetrics:
    """The comparison of one output, accumulated over validation runs in float64 chunks.

    Sums of ``a²``, ``b²``, ``a·b`` and ``(a − b)²`` over the values where both are finite give
    the relative L2 error and the cosine similarity of the whole output without ever holding it
    in float64; top-1 agreement counts equal argmaxes over the last axis, chunk by chunk.
    """

    def __init__(self, name: str):
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.mismatch: str | None = None
        self.floating = True
        self.new_nonfinite = 0
        self.max_abs = 0.0
        self.sums = np.zeros(4)  # a·a, b·b, a·b, (a − b)·(a − b)
        self.top1_same = 0
        self.top1_positions = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray, rows: int | None = None) -> None:
        """Compare one run's output. ``rows``: the rows of the inputs of this run, when the
        inputs were run in slices (the output's rows add up when its leading dimension
        follows them)."""
        if self.mismatch is not None:
            return
        if reference.shape != candidate.shape:
            self.shape = tuple(candidate.shape)
            self.mismatch = f"{self.name}: shape {candidate.shape} != original {reference.shape}"
            return
        shape = tuple(int(d) for d in reference.shape)
        if self.shape is None:
            self.shape = shape
        elif rows is not None and shape[1:] == self.shape[1:] and shape[:1] == (rows,):
            self.shape = (self.shape[0] + rows, *shape[1:])
        self.floating = bool(np.issubdtype(reference.dtype, np.floating))
        flat_a, flat_b = reference.reshape(-1), candidate.reshape(-1)
        for start in range(0, flat_a.size, COMPARE_CHUNK):
            self._add_values(
                flat_a[start : start + COMPARE_CHUNK], flat_b[start : start + COMPARE_CHUNK]
            )
        if has_class_axis(shape, self.floating):
            classes = shape[-1]
            rows_a, rows_b = reference.reshape(-1, classes), candidate.reshape(-1, classes)
            step = max(1, COMPARE_CHUNK // classes)
            for start in range(0, rows_a.shape[0], step):
                self.top1_same += int(
                    np.count_nonzero(
                        rows_a[start : start + step].argmax(axis=1)
                        == rows_b[start : start + step].argmax(axis=1)
                    )
                )
            self.top1_positions += rows_a.shape[0]

    def _add_values(self, chunk_a: np.ndarray, chunk_b: np.ndarray) -> None:
        a, b = chunk_a.astype(np.float64), chunk_b.astype(np.float64)
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        self.new_nonfinite += int(np.count_nonzero(finite_a & ~finite_b))
        both = finite_a & finite_b
        if not both.all():
            a, b = a[both], b[both]
        diff = a - b
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.sums += (a @ a, b @ b, a @ b, diff @ diff)

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.top1_positions if self.top1_positions else None

    def result(self, config: CompressionConfig) -> OutputComparison:
        """The metrics and the failures of the tolerances ``config`` sets for this output.

        Raises:
            ConfigError: ``min_top1`` names this output, which has no class axis.
        """
        if self.mismatch is not None:
            return OutputComparison(
                self.name, self.shape or (), math.inf, math.inf, 0.0, None, (self.mismatch,)
            )
        ref2, cand2, dot, diff2 = (float(x) for x in self.sums)
        norm_a, norm_b, norm_diff = math.sqrt(ref2), math.sqrt(cand2), math.sqrt(diff2)
        rel = norm_diff / norm_a if norm_a > 0 else norm_diff
        cosine = dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
        top1 = self.top1_agreement
        failures = []
        if self.new_nonfinite:
            failures.append(f"{self.name}: NaN or Inf where the original is finite")
        checked: dict[str, float] = {}
        not_applicable: list[str] = []
        measured = {"max_rel_error": rel, "min_cosine": cosine, "min_top1": top1}
        for name in TOLERANCES:
            limit = config.tolerance(name, self.name)
            if limit is None:
                continue
            value = measured[name]
            if value is None:  # min_top1 on an output without a class axis
                if names_output(config, name, self.name):
                    raise ConfigError(
                        f"--min-top1 names output {self.name!r} of shape {self.shape}, which "
                        "has no class axis (floating point, 2+ dimensions, last of size 2+); "
                        "drop it or check this output with --min-cosine / --max-rel-error"
                    )
                not_applicable.append(name)
                continue
            checked[name] = limit
            if name == "max_rel_error" and value > limit:
                failures.append(
                    f"{self.name}: relative L2 error {value:.4g} > --max-rel-error {limit:g}"
                )
            elif name == "min_cosine" and value < limit:
                failures.append(
                    f"{self.name}: cosine similarity {value:.4g} < --min-cosine {limit:g}"
                )
            elif name == "min_top1" and value < limit:
                failures.append(
                    f"{self.name}: top-1 agreement {value:.4g} < --min-top1 {limit:g} "
                    f"({self.top1_positions} positions)"
                )
        return OutputComparison(
            self.name,
            self.shape or (),
            self.max_abs,
            rel,
            cosine,
            top1,
            tuple(failures),
            top1_positions=self.top1_positions or None,
            checked=checked,
            not_applicable=tuple(not_applicable),
        )


def names_output(config: CompressionConfig, tolerance: str, output: str) -> bool:
    """True when ``tolerance`` names ``output`` explicitly (not through the value for all)."""
    value = getattr(config, tolerance)
    return isinstance(value, Mapping) and output in value


def compare_output(
    name: str, reference: np.ndarray, candidate: np.ndarray, config: CompressionConfig
) -> OutputComparison:
    """Metrics and tolerance failures of one output (``OutputMetrics`` over one run)."""
    metrics = OutputMetrics(name)
    metrics.add(reference, candidate)
    return metrics.result(config)


#: Weight of a score output's relative error added to its KL divergence (``degradation``).
#: When a model is certain of every held-out sample, the KL of many candidates is at float32
#: rounding level (1e-10 on the MNIST CNN); this term still orders them by how far they move
#: the scores.
TIE_BREAK = 1e-3
_EPS = 1e-12


def _distribution(scores: np.ndarray, probabilities: bool) -> np.ndarray:
    scores = scores.astype(np.float64)
    if probabilities:
        scores = np.clip(scores, 0.0, None) + _EPS
        return scores / scores.sum(axis=1, keepdims=True)
    scores = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(scores)
    return exp / exp.sum(axis=1, keepdims=True)


def is_scores(reference: np.ndarray) -> bool:
    """Whether an output holds scores: floating point, samples × classes (two or more)."""
    return (
        reference.ndim == 2
        and reference.shape[1] >= 2
        and np.issubdtype(reference.dtype, np.floating)
    )


def _relative(reference: np.ndarray, candidate: np.ndarray) -> float:
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    norm = float(np.linalg.norm(a))
    diff = float(np.linalg.norm(a - b))
    return diff / norm if norm > 0 else diff


def degradation(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Sum over outputs of the mean KL divergence (score outputs) or relative error (others)."""
    total = 0.0
    for ref, out in zip(reference, candidate, strict=True):
        if not np.issubdtype(ref.dtype, np.floating):
            total += float(np.mean(ref != out))
            continue
        if is_scores(ref):
            probabilities = bool(np.all((ref >= 0) & (ref <= 1)))
            p = _distribution(ref, probabilities)
            q = _distribution(out, probabilities)
            if not probabilities:
                q = np.clip(q, _EPS, None)
            kl = np.sum(p * (np.log(p + _EPS) - np.log(q + _EPS)), axis=1)
            total += float(np.mean(np.clip(kl, 0.0, None)))
            total += TIE_BREAK * _relative(ref, out)
        else:
            total += _relative(ref, out)
    if not np.isfinite(total):
        return float(np.finfo(np.float64).max)
    return total
