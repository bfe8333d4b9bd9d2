r"""Sequential, anchored refit of the calibrated factors (``--refit``).

Calibration (whiten.py) fits every layer on the *original* model's activations. In the
compressed model, though, a layer sees the outputs of the compressed layers before it. The
refit fixes that, layer after layer in topological order: each layer sees its inputs ``X̂``
from the *partly compressed* model (the layers before it already refitted) and is fitted to
the *original* outputs ``α·W X`` on the original inputs ``X`` (anchored to the original model,
so errors do not accumulate).

**Tier 1: refit the left factor and the bias, in closed form.** The right factors ``V_i`` (the
whitened ones, per channel group) stay. With ``z = [V_1 x̂_1; …; V_g x̂_g]`` (``g·r`` values per
input vector) and ``t = α·W x``, the new left factor ``U = [U_1 … U_g]`` and bias shift ``c``
solve the least-squares problem

    min_{U, c} Σ ‖t − (α·U z + c)‖²,
    [α·U, c] = T Zₐᵀ (Zₐ Zₐᵀ + δI)⁻¹,    Zₐ = [Z; 1],

over all calibration vectors. It needs the ``(g·r + 1)²`` Gram matrix ``Zₐ Zₐᵀ`` and the
``f × (g·r + 1)`` cross products ``T Zₐᵀ``, accumulated in float64 chunk by chunk (any group
count, any width). The new bias is ``b' = b + c``. When ``X̂ = X`` and ``V`` is the whitened
factor, the least-squares solution is exactly the calibrated ``U`` and bias correction, so the
refit only departs from them where the compressed model's inputs differ.

**Few vectors: shrink toward the calibrated solution.** A layer after global pooling sees one
vector per sample; with ``n`` vectors and ``d = g·r + 1`` unknowns per output the plain
solution interpolates the calibration samples when ``n ≤ d`` (measured: EfficientNet-Lite0's
1000-class classifier refitted on 96 images lost half of the top-1 agreement). So the solution
is a ridge toward the calibrated ``P₀ = [α·U₀, c₀]``,

    [α·U, c] = (T Zₐᵀ + λ P₀)(Zₐ Zₐᵀ + λI)⁻¹,    λ = d · tr(Zₐ Zₐᵀ)/(d·n) + δ = tr(Zₐ Zₐᵀ)/n + δ,

i.e. ``λ`` is the mean diagonal of ``Zₐ Zₐᵀ`` times ``d/n``: the data weigh about
``n/(n + d)``, negligible shrinkage for a conv with thousands of positions per sample, strong
for a classifier on a few hundred pooled vectors. ``δ = 10⁻⁹`` of the mean diagonal keeps the
system solvable when some ``z`` never vary.

**Passes by topological level.** A layer's level is one more than the highest level of the
compressed layers upstream of it. All layers of one level are refitted from one pass of the
calibration set through the original and the compressed model (ONNX Runtime, batch by batch,
exposing the layers' inputs), so the cost is one pass of both models per level. Layers with a
tied weight, inside subgraphs, or whose bias is not a readable constant keep their calibrated
factors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from .activations import CHUNK_BYTES, MIN_CHUNK_ROWS, layer_vectors
from .graphs import attribute
from .records import CalibratedLayer, Calibration
from .rewrite import rewrite
from .sessions import run_batches
from .types import Discovery, Layer, Progress
from .whiten import node_biases

__all__ = ["RIDGE", "levels", "refit_layers"]

log = logging.getLogger(__name__)

#: Relative ridge ``δ`` added to the diagonal of the Gram matrix.
RIDGE = 1e-9


def levels(discovery: Discovery, names: Sequence[str]) -> dict[str, int]:
    """Topological level of each named main-graph layer: 0 when no other named layer is
    upstream of it, else one more than the highest such layer's level."""
    graph = discovery.model.graph
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output}
    layer_at = {discovery.layer(name).node_index: name for name in names}
    upstream: dict[int, frozenset[str]] = {}  # node index -> named layers at or above it

    def above(index: int) -> frozenset[str]:
        stack, order, seen = [index], [], set()
        while stack:  # iterative post-order: deep graphs do not hit the recursion limit
            current = stack.pop()
            if current in upstream or current in seen:
                continue
            seen.add(current)
            order.append(current)
            for name in graph.node[current].input:
                if name in producer and producer[name] not in upstream:
                    stack.append(producer[name])
        for current in sorted(order):  # graph order is topological: inputs come first
            found: set[str] = set()
            for name in graph.node[current].input:
                if name in producer:
                    found |= upstream.get(producer[name], frozenset())
            if current in layer_at:
                found.add(layer_at[current])
            upstream[current] = frozenset(found)
        return upstream[index]

    result: dict[str, int] = {}
    for name in sorted(names, key=lambda n: discovery.layer(n).node_index):
        node = graph.node[discovery.layer(name).node_index]
        before: set[str] = set()
        for input_name in node.input[:1]:
            if input_name in producer:
                before |= above(producer[input_name])
        result[name] = 1 + max((result[other] for other in before), default=-1)
    return result


def _original_bias(
    graph: onnx.GraphProto, layer: Layer, item: CalibratedLayer
) -> np.ndarray | None:
    """``b`` (output units) of the layer's node, None when it is not a readable constant."""
    node = graph.node[layer.node_index]
    corrected = item.biases.get(layer.name)
    if corrected is not None:
        return np.asarray(corrected, dtype=np.float64) - item.shifts[layer.name]
    had_bias = layer.op_type != "MatMul" and len(node.input) > 2 and bool(node.input[2])
    return None if had_bias else np.zeros(layer.out_channels)


class _Sums:
    """``Zₐ Zₐᵀ`` and ``T Zₐᵀ`` of one layer."""

    def __init__(self, layer: Layer, weight: np.ndarray, item: CalibratedLayer, alpha: float):
        factors = item.factors
        self.groups, self.rank = factors.groups, factors.rank
        self.first = factors.first  # (g, r, w)
        self.weight = alpha * weight
        size = self.groups * self.rank + 1
        self.gram = np.zeros((size, size))
        self.cross = np.zeros((layer.out_channels, size))
        self.count = 0
        shift = item.shifts[layer.name]
        self.prior = np.concatenate([alpha * factors.second, shift[:, None]], axis=1)

    def add(self, original: np.ndarray, compressed: np.ndarray) -> None:
        count = original.shape[0]
        width = self.first.shape[2]
        blocks = compressed.reshape(count, self.groups, width)
        z = np.empty((count, self.groups * self.rank + 1))
        for group in range(self.groups):
            columns = slice(group * self.rank, (group + 1) * self.rank)
            z[:, columns] = blocks[:, group, :] @ self.first[group].T
        z[:, -1] = 1.0
        self.gram += z.T @ z
        self.count += count
        self.cross += (original @ self.weight.T).T @ z

    def solve(self) -> np.ndarray:
        """``[α·U, c]`` (``f × (g·r + 1)``), shrunk toward the calibrated solution ``P₀``:
        ``(T Zₐᵀ + λ P₀)(Zₐ Zₐᵀ + λ I)⁻¹`` with ``λ = tr(Zₐ Zₐᵀ)/n + δ``."""
        size = self.gram.shape[0]
        scale = max(np.trace(self.gram) / size, 1e-300)
        shrink = size * scale / max(self.count, 1) + RIDGE * scale
        system = self.gram + shrink * np.eye(size)
        return np.linalg.solve(system, (self.cross + shrink * self.prior).T).T


def refit_layers(
    discovery: Discovery,
    calibration: Calibration,
    calibrated: Mapping[str, CalibratedLayer],
    progress: Progress | None = None,
) -> dict[str, CalibratedLayer]:
    """The calibrated layers with their left factors and biases refitted in topological order.

    Args:
        discovery: the layers of the analysis model ``discovery.model``.
        calibration: the calibration data (its ``feeds``) and providers.
        calibrated: the whitened factors and bias corrections of the chosen layers.
        progress: callback ``(stage, done, total)``; stage ``"refit L/N"`` for pass ``L`` of
            ``N`` (samples done).
    """
    model, graph = discovery.model, discovery.model.graph
    result = dict(calibrated)
    eligible = []
    for name in calibrated:
        layer = discovery.layer(name)
        if layer.graph_path or layer.tied or layer.lookup:  # tables have no input to refit on
            continue
        if _original_bias(graph, layer, calibrated[name]) is None:
            continue
        eligible.append(name)
    if not eligible:
        return result
    level_of = levels(discovery, eligible)
    count = max(level_of.values()) + 1
    for level in range(count):
        names = [name for name in eligible if level_of[name] == level]
        compressed = rewrite(
            model,
            [(discovery.layer(name), item.factors) for name, item in result.items()],
            biases=node_biases(result.values()),
        )
        sums, wanted, alphas = {}, {}, {}
        for name in names:
            layer = discovery.layer(name)
            node = graph.node[layer.node_index]
            alphas[name] = float(attribute(node, "alpha", 1.0)) if layer.op_type == "Gemm" else 1.0
            sums[name] = _Sums(layer, discovery.weight(layer), result[name], alphas[name])
            wanted[node.input[0]] = layer.weight_dtype
        inputs = {info.name for info in graph.input}
        fetched = [name for name in wanted if name not in inputs]
        batches = run_batches(
            model,
            wanted,
            calibration.feeds,
            calibration.providers,
            progress,
            stage=f"refit {level + 1}/{count}",  # one progress bar per pass
            other=compressed if fetched else None,  # inputs of the model need no second run
            other_wanted=fetched,
            # a lazily loaded model's weights, and the compressed model's untouched ones,
            # are still in the original's external files
            data_dir=discovery.data_dir,
            other_data_dir=discovery.data_dir,
        )
        for originals, compressed_inputs in batches:
            for name in names:
                layer = discovery.layer(name)
                node = graph.node[layer.node_index]
                source = node.input[0]
                # at least MIN_CHUNK_ROWS vectors: products on a few rows of a very wide
                # layer run far below speed (65536-wide patches: 8 rows in CHUNK_BYTES // 2)
                limit = max(CHUNK_BYTES // 2, 8 * MIN_CHUNK_ROWS * layer.cols)
                pairs = zip(
                    layer_vectors(layer, node, originals[source], limit),
                    layer_vectors(
                        layer, node, compressed_inputs.get(source, originals[source]), limit
                    ),
                    strict=True,
                )
                for original, approximate in pairs:
                    sums[name].add(original, approximate)
        for name in names:
            layer = discovery.layer(name)
            item = result[name]
            solution = sums[name].solve()
            second = solution[:, :-1] / alphas[name]
            shift = solution[:, -1]
            bias = _original_bias(graph, layer, item)
            result[name] = CalibratedLayer(
                factors=replace(item.factors, second=np.ascontiguousarray(second)),
                biases={layer.name: bias + shift},
                shifts={layer.name: shift},
                output_error_estimate=item.output_error_estimate,
            )
        log.info("refit level %d: %d layer(s)", level, len(names))
    return result
