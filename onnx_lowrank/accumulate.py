r"""Running sums of a layer's input vectors: what calibration accumulates, on which side, on the
array backend (activations.py feeds the vectors; whiten.py reads the statistics).

**The cheaper side per group count** (DESIGN.md §7; ``plan_statistics``). The input side keeps
the diagonal blocks ``Σ_i`` of ``b`` groups (``b = 1``: ``Σ`` itself, ``cκ × cκ``); every count
that ``b`` divides reads its blocks from them, at ``cκ·w`` multiply-adds per input vector
(``w = cκ/b``). The output side keeps, for a count ``g``, the ``g`` matrices
``W_i Σ_i W_iᵀ = Cov(W_i x_i)`` (``f × f`` each), accumulated from the partial outputs
``z_i = W_i x_i``: ``g·f²`` per vector, plus ``f·cκ`` for the partial outputs of the finest
partition, from which the coarser counts are summed. So a count is cheaper on the input side
exactly when its groups are narrower than ``f`` (``w ≤ f``): the finest counts of a wide layer
take input blocks, the coarse ones the output side.

**On the backend.** Sums and products run through the array API and ``Backend.bmm``/``add_bmm``
(NumPy, or CuPy on a GPU). Vectors are shifted by a pilot mean (the first chunk's), which avoids
cancellation in ``E[x xᵀ] − μ μᵀ``. Every sum across chunks is float64. The products within a
chunk (its Gram matrices and partial outputs, at most a few hundred vectors each) are float64
too, except for layers whose statistics cost at least ``FLOAT32_COST`` multiply-adds per
vector: there they run in float32 (about twice as fast), on vectors shifted by the pilot
rounded to float32, and each chunk's products are added into the float64 sums. A ``fork``
shares the pilot and sums another share of the samples; ``merge`` adds it back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend
from .records import LayerStatistics, Side
from .types import Layer

__all__ = [
    "FLOAT32_COST",
    "MAX_ATOMS",
    "MAX_INPUT_SIDE_BYTES",
    "Accumulator",
    "StatisticsPlan",
    "ledoit_wolf",
    "plan_statistics",
]

#: Largest input-side blocks ``Σ_i`` kept for one layer; beyond it the output side is used.
MAX_INPUT_SIDE_BYTES = 512 * 2**20
#: Most channel slices whose partial outputs serve every count at once (``_partitions``).
MAX_ATOMS = 64
#: ``StatisticsPlan.cost`` (multiply-adds per input vector) from which a layer's products run
#: in float32 within each chunk (sums across chunks stay float64). Below it, where float64
#: costs little, the statistics are float64 throughout.
FLOAT32_COST = 2**21


@dataclass(frozen=True)
class StatisticsPlan:
    """What ``collect_statistics`` accumulates for one layer ("Memory and time" above).

    Attributes:
        blocks: ``b``: the diagonal blocks ``Σ_i`` of ``b`` channel groups are kept,
            ``(b, w, w)`` with ``w = c·κ/b`` (``b = 1``: the whole ``Σ``); they serve every
            candidate group count that ``b`` divides. None: no input-side blocks.
        partitions: ``(p, counts)`` pairs: the partial outputs ``W_a x_a`` of ``p`` channel
            slices are computed, and the output covariances of ``counts`` (each dividing ``p``)
            are summed from them.
    """

    blocks: int | None
    partitions: tuple[tuple[int, tuple[int, ...]], ...] = ()

    @property
    def side(self) -> Side:
        """``"input"`` with blocks (whiten.py reads ``Σ_i`` where it can), else ``"output"``."""
        return "output" if self.blocks is None else "input"

    @property
    def output_groups(self) -> list[int]:
        """The group counts served by output covariances."""
        return sorted(g for _, counts in self.partitions for g in counts)

    def cost(self, layer: Layer) -> float:
        """Multiply-adds per input vector, the many small products counted twice (they run
        about half as fast as one large one)."""
        f, cols = layer.out_channels, layer.cols
        cost = 0.0
        if self.blocks is not None:
            cost += cols * (cols // self.blocks) * (1 if self.blocks == 1 else 2)
        for _, counts in self.partitions:
            cost += 2 * (f * cols + sum(g * f * f for g in counts))
        return cost

    def block_bytes(self, layer: Layer) -> int:
        """Bytes of the kept blocks ``Σ_i``."""
        return 0 if self.blocks is None else 8 * layer.cols * (layer.cols // self.blocks)


def _partitions(counts: Sequence[int]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """Which channel partitions to compute for the output covariances of ``counts``.

    The partial output of a group is the sum of those of the finer slices inside it, so one
    computed partition ``p`` serves every count that divides ``p``. When the finest common
    refinement ``lcm(counts)`` is small (``MAX_ATOMS``) or is itself a count (powers of two),
    it serves all; else, finest first, each count is summed from a computed partition it
    divides, or computed.
    """
    if not counts:
        return ()
    finest = math.lcm(*counts)
    if finest <= MAX_ATOMS or finest in counts:
        return ((finest, tuple(sorted(counts))),)
    computed: dict[int, list[int]] = {}
    for g in sorted(counts, reverse=True):
        source = next((p for p in computed if p % g == 0), g)
        computed.setdefault(source, []).append(g)
    return tuple((p, tuple(sorted(served))) for p, served in computed.items())


def plan_statistics(
    layer: Layer, groups: Sequence[int], side: Side | None = None
) -> StatisticsPlan:
    """The cheapest way to get the statistics of ``layer`` for the candidate ``groups``
    (DESIGN.md §7; "Memory and time" above).

    Input-side blocks of ``b`` groups serve every count that ``b`` divides, at ``c·κ·w``
    multiply-adds per input vector; the output side serves any count ``g`` at ``g·f²`` (plus
    ``f·c·κ`` per computed partition). Blocks are cheaper exactly where ``w ≤ f``, so the
    finest counts of a wide layer take blocks and the coarse ones the output side. Every
    ``b`` among the counts (and none) is tried, keeping blocks within
    ``MAX_INPUT_SIDE_BYTES``; the cheapest plan wins, ``b = 1`` on a tie.

    Args:
        layer: the layer.
        groups: its candidate group counts.
        side: ``"input"`` forces the whole ``Σ`` (``b = 1``), ``"output"`` output covariances
            for every count; None chooses.
    """
    counts = sorted(set(groups))
    if side == "input":
        return StatisticsPlan(1)
    if side == "output":
        return StatisticsPlan(None, _partitions(counts))
    plans = []
    for blocks in [1, *(g for g in counts if g > 1), None]:
        coarse = [g for g in counts if blocks is None or g % blocks]
        plans.append(StatisticsPlan(blocks, _partitions(coarse)))
    fitting = [p for p in plans if p.block_bytes(layer) <= MAX_INPUT_SIDE_BYTES]
    return min(fitting, key=lambda plan: plan.cost(layer))


class Accumulator:
    """Running sums of one layer's input vectors, shifted by a pilot mean ``m``, on a backend.

    ``dtype`` is that of the products within a chunk: float32 where the plan costs at least
    ``FLOAT32_COST`` per vector, else float64 (None); the sums are float64 either way.
    """

    def __init__(
        self,
        layer: Layer,
        weight: np.ndarray,
        plan: StatisticsPlan,
        backend: Backend,
        dtype: type[np.floating] | None = None,
    ):
        self.layer, self.plan, self.backend = layer, plan, backend
        if dtype is None:
            dtype = np.float32 if plan.cost(layer) >= FLOAT32_COST else np.float64
        self.dtype = dtype
        xp = backend.xp
        self.work_dtype = xp.float32 if dtype == np.float32 else xp.float64
        cols, f = layer.cols, layer.out_channels
        self.count = 0
        self.pilot: Any = None  # float64, each value representable in ``dtype``
        self.pilot_work: Any = None  # the same in ``dtype``
        self.total = xp.zeros(cols, dtype=xp.float64)
        self.squares = xp.zeros(cols, dtype=xp.float64)
        self.weight = weight
        self.use_sums: dict[str, Any] = {}  # node name -> Σ x, for tied uses
        self.use_counts: dict[str, int] = {}
        self.outer = None
        if plan.blocks is not None:
            width = cols // plan.blocks
            self.outer = xp.zeros((plan.blocks, width, width), dtype=xp.float64)
        #: float64 values held per input vector while it is processed
        self.row_values = max([cols, *(p * f for p, _ in plan.partitions)])
        self.slice_weights = {  # W_a, (p, width, f) per partition
            p: backend.asarray(
                np.ascontiguousarray(weight.reshape(f, p, -1).transpose(1, 2, 0)), dtype
            )
            for p, _ in plan.partitions
        }
        groups = plan.output_groups
        self.partial_total = {g: xp.zeros((g, f), dtype=xp.float64) for g in groups}
        self.partial_outer = {g: xp.zeros((g, f, f), dtype=xp.float64) for g in groups}
        # Σ ‖z‖⁴ and Σ ‖z‖² z of the outputs z = W (x − m), for the shrinkage (ledoit_wolf),
        # kept only while the vectors are few enough for it (n ≤ c·κ per node); from the
        # partial outputs of g = 1 where the output side has them, else from Σ's side
        self.few = cols * len(layer.uses())
        self.fourth = 0.0
        self.cubic = np.zeros(f if 1 in groups else cols)  # Σ ‖z‖² z, or Σ ‖z‖² y
        self.projection: Any = None
        if 1 not in groups and plan.blocks == 1:  # ‖W y‖² as ‖y Wᵀ‖² or yᵀ(WᵀW)y
            matrix = weight.T if f <= cols else weight.T @ weight
            self.projection = backend.asarray(np.ascontiguousarray(matrix), dtype)

    def fork(self) -> Accumulator:
        """An empty accumulator with this one's pilot mean, whose sums ``merge`` adds here
        (one per worker: they share no state while they run)."""
        other = Accumulator(self.layer, self.weight, self.plan, self.backend, self.dtype)
        other.pilot, other.pilot_work = self.pilot, self.pilot_work
        other.projection = self.projection
        return other

    def merge(self, other: Accumulator) -> None:
        """Add the sums of a ``fork`` of this accumulator."""
        self.count += other.count
        self.total += other.total
        self.squares += other.squares
        if self.outer is not None:
            self.outer += other.outer
        for g in self.partial_total:
            self.partial_total[g] += other.partial_total[g]
            self.partial_outer[g] += other.partial_outer[g]
        self.fourth += other.fourth
        self.cubic += other.cubic
        for use, sums in other.use_sums.items():
            self.use_sums[use] = self.use_sums.get(use, 0.0) + sums
            self.use_counts[use] = self.use_counts.get(use, 0) + other.use_counts[use]

    def add(self, vectors: np.ndarray, use: str | None = None) -> None:
        """Add a chunk of input vectors ``(n, c·κ)`` (overwritten on NumPy when of the
        accumulator's ``dtype``)."""
        backend, xp = self.backend, self.backend.xp
        n, f = len(vectors), self.layer.out_channels
        shifted = backend.asarray(vectors, self.dtype)  # NumPy: ``vectors``, shifted in place
        if self.pilot is None:
            pilot = xp.mean(xp.astype(shifted, xp.float64), axis=0)
            self.pilot_work = xp.astype(pilot, self.work_dtype)
            self.pilot = xp.astype(self.pilot_work, xp.float64)
        shifted -= self.pilot_work
        sums = backend.sum_rows(shifted)
        if use is not None:
            self.use_sums[use] = self.use_sums.get(use, 0.0) + sums + n * self.pilot
            self.use_counts[use] = self.use_counts.get(use, 0) + n
        self.count += n
        self.total += sums
        self.squares += backend.sum_squares(shifted)  # only the damping scale reads it
        if self.outer is not None:
            if self.plan.blocks == 1:
                backend.add_into(self.outer, xp.matrix_transpose(shifted) @ shifted)
                if self.projection is not None and self.count <= self.few:
                    z = shifted @ self.projection
                    narrow = self.layer.out_channels <= self.layer.cols  # z = W y, or (WᵀW) y
                    self._add_moments(xp.sum((z if narrow else shifted) * z, axis=1), shifted)
            else:  # Σ_i per group: (b, w, n) @ (b, n, w)
                stack = _slices(xp, shifted, self.plan.blocks)
                backend.add_bmm(self.outer, xp.matrix_transpose(stack), stack)
        for p, counts in self.plan.partitions:
            # W_a (x_a − m_a), (p, n, f); a group's partial output sums those of its slices,
            # each count summed from the finest one done that it divides
            done = {p: backend.bmm(_slices(xp, shifted, p), self.slice_weights[p])}
            for g in sorted(counts, reverse=True):
                if g not in done:
                    finer = min(h for h in done if h % g == 0)
                    done[g] = xp.sum(xp.reshape(done[finer], (g, finer // g, n, f)), axis=1)
                z = done[g]
                self.partial_total[g] += xp.sum(z, axis=1, dtype=xp.float64)
                backend.add_bmm(self.partial_outer[g], xp.matrix_transpose(z), z)
                if g == 1 and self.count <= self.few:
                    self._add_moments(xp.sum(z[0, ...] * z[0, ...], axis=1), z[0, ...])

    def _add_moments(self, norms: Any, vectors: Any) -> None:
        """``Σ a²`` and ``Σ a·v`` of the squared output norms ``a = ‖z‖²`` of a chunk."""
        numpy, xp = self.backend.to_numpy, self.backend.xp
        norms = xp.astype(norms, xp.float64)
        self.fourth += float(numpy(xp.sum(norms * norms)))
        self.cubic += numpy(norms @ xp.astype(vectors, xp.float64))

    def statistics(self) -> LayerStatistics:
        numpy = self.backend.to_numpy
        n = max(self.count, 1)
        total = numpy(self.total)
        pilot = numpy(self.pilot) if self.pilot is not None else np.zeros_like(total)
        shift = total / n
        mean = pilot + shift
        variance = numpy(self.squares) / n - shift * shift
        name = self.layer.name
        # Tied uses: remove the scatter of the uses' means around the pooled mean (``d_u``),
        # which leaves the covariance within the uses (see LayerStatistics.use_means).
        use_means = {
            u: numpy(sums) / max(self.use_counts[u], 1) for u, sums in self.use_sums.items()
        }
        spread = [(self.use_counts[u] / n, m - mean) for u, m in use_means.items()]
        spread = spread if len(spread) > 1 else []
        for weight, d in spread:
            variance -= weight * d * d
        variance = np.maximum(variance, 0.0)
        use_means = use_means if spread else {}
        covariance = None
        if self.outer is not None:
            blocks = self.plan.blocks
            covariance = numpy(self.outer) / n - _block_outer(shift, blocks)
            for weight, d in spread:
                covariance -= weight * _block_outer(d, blocks)
            covariance = (covariance + covariance.transpose(0, 2, 1)) / 2
            if blocks == 1:
                covariance = covariance[0]
        output: dict[int, np.ndarray] = {}
        f = self.layer.out_channels
        for g in self.plan.output_groups:
            partial_total = numpy(self.partial_total[g]) / n  # (g, f)
            matrix = numpy(self.partial_outer[g]) / n
            matrix -= partial_total[:, :, None] * partial_total[:, None, :]
            blocks = self.weight.reshape(f, g, -1).transpose(1, 0, 2)  # (g, f, width)
            for weight, d in spread:
                wd = np.einsum("gfw,gw->gf", blocks, d.reshape(g, -1))  # W_i d_i
                matrix -= weight * wd[:, :, None] * wd[:, None, :]
            output[g] = (matrix + matrix.transpose(0, 2, 1)) / 2
        return LayerStatistics(
            name,
            self.plan.side,
            self.count,
            mean,
            variance,
            covariance=covariance,
            output_covariance=output or None,
            use_means=use_means,
            shrinkage=self._shrinkage(covariance, output, variance),
        )

    def _shrinkage(
        self, covariance: np.ndarray | None, output: dict[int, np.ndarray], variance: np.ndarray
    ) -> float:
        """``γ`` (``ledoit_wolf``) from the moments of ``z = W (x − m)``, only where the
        vectors are few, ``n ≤ c·κ`` (``Σ`` singular); else 0. A tied weight counts one
        node's share, ``n / nodes``: its nodes rarely see independent inputs."""
        if self.count > self.few or self.count < 2 or not variance.size:
            return 0.0
        numpy, w = self.backend.to_numpy, self.weight
        if 1 in output:  # M = W Σ Wᵀ, Σ z zᵀ and Σ z from the partial outputs
            moments = (output[1][0], numpy(self.partial_outer[1])[0])
            total, cubic = numpy(self.partial_total[1])[0], self.cubic
        elif covariance is not None and covariance.ndim == 2:  # from Σ and Σ y yᵀ
            moments = (w @ covariance @ w.T, w @ numpy(self.outer)[0] @ w.T)
            total, cubic = w @ numpy(self.total), w @ self.cubic
        else:
            return 0.0
        fourth = _centred_fourth(self.fourth, cubic, moments[1], total, self.count) / self.count
        count = self.count / len(self.layer.uses())
        return ledoit_wolf(moments[0], w @ w.T, float(np.mean(variance)), fourth, count)


def _centred_fourth(
    fourth: float, cubic: np.ndarray, outer: np.ndarray, total: np.ndarray, count: int
) -> float:
    """``Σ ‖z − δ‖⁴``, ``δ = total / n``, from ``Σ ‖z‖⁴``, ``Σ ‖z‖² z``, ``Σ z zᵀ`` and ``Σ z``
    around a pilot: with ``a = ‖z‖²``, ``Σ (a − 2 z·δ + ‖δ‖²)² = Σ a² − 4 δ·Σ a z
    + 4 δᵀ(Σ z zᵀ)δ + 2‖δ‖² Σ a − 4‖δ‖² δ·Σ z + n ‖δ‖⁴``."""
    delta = total / count
    square = float(delta @ delta)
    value = fourth - 4 * float(delta @ cubic) + 4 * float(delta @ outer @ delta)
    value += square * (2 * float(np.trace(outer)) - 4 * float(delta @ total) + count * square)
    return max(value, 0.0)


def ledoit_wolf(
    covariance: np.ndarray, target: np.ndarray, scale: float, fourth: float, count: float
) -> float:
    r"""Shrinkage ``γ`` of the input covariance toward its diagonal mean (docs/calibration.md).

    Whitening uses ``Σ' = (1 − γ)·Σ + γ·m·I``, ``m = tr Σ / (c·κ)`` (``scale``). The factors
    see ``Σ`` only through ``M = W Σ Wᵀ`` (``covariance``), the covariance of the outputs
    ``z = W x``, so ``γ`` is Ledoit and Wolf's (2004) estimate for ``M`` and the target
    ``T = m·W Wᵀ`` (``target`` is ``W Wᵀ``), which minimizes the expected squared Frobenius
    error of ``(1 − γ)·M + γ·T``:

        γ = min(1, b²/d²),  b² = (1/n²) Σ_k ‖z_k z_kᵀ − M‖² = (E‖z‖⁴ − ‖M‖²)/n,  d² = ‖M − T‖²,

    ``z`` centred, ``fourth = E‖z‖⁴``, ``n = count``; ``b²`` is the sampling noise of ``M``.
    """
    squared = float(np.sum(covariance * covariance))
    distance = float(np.sum((covariance - scale * target) ** 2))
    if count < 2 or scale <= 0 or distance <= 0:
        return 0.0
    return float(min(1.0, max(fourth - squared, 0.0) / count / distance))


def _slices(xp: Any, matrix: Any, count: int) -> Any:
    """``(n, c·κ)`` -> ``(count, n, c·κ/count)``: the columns of each channel slice."""
    rows, cols = matrix.shape
    return xp.permute_dims(xp.reshape(matrix, (rows, count, cols // count)), (1, 0, 2))


def _block_outer(vector: np.ndarray, blocks: int) -> np.ndarray:
    """``v_i v_iᵀ`` of each of the ``blocks`` slices of ``v``, ``(blocks, w, w)``."""
    parts = vector.reshape(blocks, -1)
    return parts[:, :, None] * parts[:, None, :]
