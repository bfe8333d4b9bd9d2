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

over all calibration vectors (any group count, any width; float64). The new bias is
``b' = b + c``. When ``X̂ = X`` and ``V`` is the whitened
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

**Cost: the smaller of two systems.** With ``d = g·r + 1`` unknowns per output and ``n``
vectors, the solution is written around the calibrated one, ``P = P₀ + R Zₐᵀ (Zₐ Zₐᵀ + λI)⁻¹``
with the residual ``R = T − P₀ Zₐ``, which by the push-through identity is also
``P₀ + R (Zₐᵀ Zₐ + λI)⁻¹ Zₐᵀ``. While ``n < d`` the chunks of ``Zₐ`` and ``R`` are kept and the
``n × n`` dual system is solved (``n²·d`` multiply-adds); otherwise the ``d × d`` Gram matrix
``Zₐ Zₐᵀ`` and ``R Zₐᵀ`` are accumulated chunk by chunk (``n·d²``) and the primal system
solved. A wide layer with many groups has ``d`` in the ten thousands (CREPE full's
``1024 × 64``-tap conv at 1024 groups of rank 17: 17409), where the Gram matrix alone was
2.4 GB and its solve took 98 s (cProfile); on 8 frames (``n = 1024``) the dual system is 17 times
smaller. Where neither fits ``MAX_BYTES`` (many vectors and a huge ``d``), the dual system
rests on an evenly spread subset of the vectors (every ``2^k``-th), the most that fits.

**Passes by topological level.** A layer's level is one more than the highest level of the
compressed layers upstream of it. All layers of one level are refitted from one pass of the
calibration set through the compressed model (ONNX Runtime, batch by batch, exposing the
layers' inputs), which runs only the nodes the level's inputs need (``_truncated``), so the
early levels of a chain cost a fraction of a pass. The original model's inputs of every level
come from one pass before the first (``_original_inputs``) when they fit ``MAX_BYTES``;
otherwise each level runs the original model as well. Layers with a tied weight, inside
subgraphs, or whose bias is not a readable constant keep their calibrated factors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from .activations import CHUNK_BYTES, MIN_CHUNK_ROWS, layer_vectors
from .graphs import attribute
from .records import CalibratedLayer, Calibration
from .rewrite import rewrite
from .sessions import run_batches
from .surgery import Surgery
from .types import Discovery, Layer, Progress
from .whiten import node_biases

__all__ = ["MAX_BYTES", "RIDGE", "levels", "refit_layers"]

log = logging.getLogger(__name__)

#: Relative ridge ``δ`` added to the diagonal of the Gram matrix.
RIDGE = 1e-9
#: Most bytes one layer's least-squares system may hold (its Gram matrix, or its kept vectors).
MAX_BYTES = 2**30


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
    r"""The least-squares system of one layer, ``P = P₀ + R Zₐᵀ (Zₐ Zₐᵀ + λI)⁻¹`` with the
    residual ``R = T − P₀ Zₐ`` of the calibrated solution ``P₀ = [α·U₀, c₀]`` ("Cost" above).

    While the vectors are fewer than the unknowns ``d = g·r + 1`` (and fit ``MAX_BYTES``), the
    chunks of ``Zₐ`` and ``R`` are kept and the system is solved in its dual form,
    ``P = P₀ + R (Zₐᵀ Zₐ + λI)⁻¹ Zₐᵀ``, an ``n × n`` system; beyond, the ``d × d`` Gram
    matrix ``Zₐ Zₐᵀ`` and ``R Zₐᵀ`` are accumulated. When even the Gram matrix would not fit
    ``MAX_BYTES`` (very wide layers with many groups), the kept vectors are thinned instead:
    every time they overflow, every other one is dropped and from then on only every other
    new one is kept (``stride``), so the dual system rests on an evenly spread subset.
    """

    def __init__(
        self,
        layer: Layer,
        weight: np.ndarray,
        item: CalibratedLayer,
        alpha: float,
        max_bytes: int = MAX_BYTES,
    ):
        factors = item.factors
        self.groups, self.rank = factors.groups, factors.rank
        self.first = factors.first  # (g, r, w)
        self.weight = alpha * weight
        self.size = self.groups * self.rank + 1
        self.max_bytes = max_bytes
        # the Gram matrix and its factorization's copy
        self.primal = 16 * self.size * self.size <= max_bytes
        self.kept: list[tuple[np.ndarray, np.ndarray]] = []  # chunks of Zₐᵀ and Rᵀ
        self.kept_rows = 0
        self.stride, self.seen = 1, 0
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.count = 0  # vectors in the system
        shift = item.shifts[layer.name]
        self.prior = np.concatenate([alpha * factors.second, shift[:, None]], axis=1)

    def add(self, original: np.ndarray, compressed: np.ndarray) -> None:
        count = original.shape[0]
        width = self.first.shape[2]
        blocks = compressed.reshape(count, self.groups, width)
        z = np.empty((count, self.size))
        for group in range(self.groups):
            columns = slice(group * self.rank, (group + 1) * self.rank)
            np.matmul(blocks[:, group, :], self.first[group].T, out=z[:, columns])
        z[:, -1] = 1.0
        residual = original @ self.weight.T - z @ self.prior.T  # Rᵀ, (n, f)
        if self.gram is not None:
            self._accumulate(z, residual)
            return
        if not self.primal:  # thinned: every stride-th vector of the stream
            keep = (self.seen + np.arange(count)) % self.stride == 0
            self.seen += count
            z, residual = z[keep], residual[keep]
        self.kept.append((z, residual))
        self.kept_rows += len(z)
        self.count += len(z)
        # the kept vectors, and the n × n system of the dual form with its factorization's copy
        kept_bytes = 8 * self.kept_rows * (self.size + residual.shape[1])
        overflow = max(kept_bytes, 16 * self.kept_rows**2) > self.max_bytes
        if self.kept_rows < self.size and not overflow:
            return
        if self.primal:  # more vectors than unknowns: the Gram matrix is the smaller
            self.gram = np.zeros((self.size, self.size))
            self.cross = np.zeros((self.prior.shape[0], self.size))
            for z, residual in self.kept:
                self._accumulate(z, residual, counted=True)
            self.kept = []
        elif overflow:
            self.kept = [(z[::2], residual[::2]) for z, residual in self._joined()]
            self.kept_rows = self.count = len(self.kept[0][0])
            self.stride *= 2

    def _accumulate(self, z: np.ndarray, residual: np.ndarray, counted: bool = False) -> None:
        assert self.gram is not None and self.cross is not None
        self.gram += z.T @ z
        self.cross += residual.T @ z
        if not counted:
            self.count += len(z)

    def _joined(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if len(self.kept) > 1:
            self.kept = [
                (
                    np.concatenate([z for z, _ in self.kept]),
                    np.concatenate([r for _, r in self.kept]),
                )
            ]
        return self.kept

    def solve(self) -> np.ndarray:
        """``[α·U, c]`` (``f × (g·r + 1)``), shrunk toward the calibrated solution ``P₀``:
        ``P₀ + R Zₐᵀ (Zₐ Zₐᵀ + λ I)⁻¹`` with ``λ = tr(Zₐ Zₐᵀ)/n + δ``."""
        size, count = self.size, max(self.count, 1)
        if self.gram is not None:
            trace = float(np.trace(self.gram))
        else:
            trace = float(sum(np.einsum("nd,nd->", z, z) for z, _ in self.kept))
        scale = max(trace / size, 1e-300)
        shrink = trace / count + RIDGE * scale
        if self.gram is not None:
            assert self.cross is not None
            system = self.gram + shrink * np.eye(size)
            return self.prior + np.linalg.solve(system, self.cross.T).T
        if not self.kept:
            return self.prior
        ((z, residual),) = self._joined()
        kernel = z @ z.T  # Zₐᵀ Zₐ, (n, n)
        kernel[np.diag_indices_from(kernel)] += shrink
        return self.prior + np.linalg.solve(kernel, residual).T @ z


def _truncated(model: onnx.ModelProto, outputs: Mapping[str, int]) -> onnx.ModelProto:
    """``model`` computing only the main-graph tensors ``outputs`` (name -> element type), as
    its only graph outputs: the nodes after them, which no output needs, are dropped
    (onnx-graphsurgeon's ``cleanup``), so a pass for an early level runs only the layers
    before it. No outputs: ``model`` itself."""
    if not outputs:
        return model
    surgery = Surgery(model)
    graph = surgery.graph
    tensors = graph.tensors()
    for name, elem_type in outputs.items():
        if tensors[name].dtype is None:
            tensors[name].dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    graph.outputs = [tensors[name] for name in outputs]
    graph.cleanup()
    return surgery.export()


def _counter(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """A graph input fed by the calibration data, and its element type: fetched with each
    batch, it tells how many samples the batch holds."""
    types = {info.name: info.type.tensor_type.elem_type for info in model.graph.input}
    name = next(name for name in feeds if name in types)
    return name, types[name]


def _original_inputs(
    model: onnx.ModelProto,
    wanted: Mapping[str, int],
    calibration: Calibration,
    progress: Progress | None,
    data_dir: str | None,
) -> dict[str, np.ndarray] | None:
    """Every level's inputs in the original model, over the whole calibration set, from one
    pass (``"refit: original inputs"``), so that each level then runs only the compressed
    model. None, and each level runs both models, when they hold more than ``MAX_BYTES`` or a
    tensor's first axis is not the samples'."""
    counter, elem_type = _counter(model, calibration.feeds)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    held = 0
    for values, _ in run_batches(
        _truncated(model, wanted),
        {**wanted, counter: elem_type},
        calibration.feeds,
        calibration.providers,
        progress,
        stage="refit: original inputs",
        data_dir=data_dir,
    ):
        samples = len(values[counter])
        for name in wanted:
            if values[name].ndim == 0 or values[name].shape[0] != samples:
                return None
            parts[name].append(values[name])
            held += values[name].nbytes
        if 2 * held > MAX_BYTES:  # the parts and their concatenation
            return None
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _with_cached(
    cached: Mapping[str, np.ndarray],
    compressed: onnx.ModelProto,
    wanted: Mapping[str, int],
    calibration: Calibration,
    progress: Progress | None,
    stage: str,
    data_dir: str | None,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """``run_batches``' pairs (original inputs, compressed inputs) of one level, the original
    ones sliced from ``cached`` by the samples of each batch of the compressed model."""
    counter, elem_type = _counter(compressed, calibration.feeds)
    start = 0
    for values, _ in run_batches(
        compressed,
        {**wanted, counter: elem_type},
        calibration.feeds,
        calibration.providers,
        progress,
        stage=stage,
        data_dir=data_dir,
    ):
        samples = len(values[counter])
        originals = {
            name: cached[name][start : start + samples] if name in cached else values[name]
            for name in wanted
        }
        start += samples
        yield originals, values


def refit_layers(
    discovery: Discovery,
    calibration: Calibration,
    calibrated: Mapping[str, CalibratedLayer],
    progress: Progress | None = None,
    *,
    reuse_originals: bool = True,
) -> dict[str, CalibratedLayer]:
    """The calibrated layers with their left factors and biases refitted in topological order.

    Args:
        discovery: the layers of the analysis model ``discovery.model``.
        calibration: the calibration data (its ``feeds``) and providers.
        calibrated: the whitened factors and bias corrections of the chosen layers.
        progress: callback ``(stage, done, total)``; stage ``"refit L/N"`` for pass ``L`` of
            ``N`` (samples done), after ``"refit: original inputs"`` when they are reused.
        reuse_originals: with more than one level, compute every level's original inputs in
            one pass when they fit ``MAX_BYTES`` (``_original_inputs``); False: each level
            runs the original model too.
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
    inputs = {info.name for info in graph.input}
    every = {}  # the inputs of every level's layers, that the original model computes
    for name in eligible:
        layer = discovery.layer(name)
        source = graph.node[layer.node_index].input[0]
        if source not in inputs:
            every[source] = layer.weight_dtype
    cached = None
    if reuse_originals and count > 1 and every:
        cached = _original_inputs(model, every, calibration, progress, discovery.data_dir)
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
        fetched = {name: wanted[name] for name in wanted if name not in inputs}
        stage = f"refit {level + 1}/{count}"  # one progress bar per pass
        if cached is not None and fetched:
            batches = _with_cached(
                cached,
                _truncated(compressed, fetched),
                wanted,
                calibration,
                progress,
                stage,
                discovery.data_dir,
            )
        else:
            batches = run_batches(
                _truncated(model, fetched),
                wanted,
                calibration.feeds,
                calibration.providers,
                progress,
                stage=stage,
                # inputs of the model need no second run
                other=_truncated(compressed, fetched) if fetched else None,
                other_wanted=list(fetched),
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
