r"""Output errors after compression: what the factors really do to each layer's outputs.

The error tables (whiten.py) *estimate* a candidate's relative output error from the whitened
spectra. After compression, ``measure_output_errors`` measures two relative errors of every
compressed layer on the calibration data, both relative to the spread ``‖Y − Ȳ‖`` of the
layer's original output around its own per-channel mean:

* **local**: the layer alone replaced, on the original model's activations,
  ``Ŷ − Y = −(α(W − Ŵ)x − α(W − Ŵ)μ)`` once the bias is corrected; it is what the estimate
  estimates;
* **network**: the layer's output in the compressed model (every layer replaced) against the
  original's, which includes the errors of the layers upstream.

Everything runs in ONNX Runtime, batch by batch (``sessions.run_batches``): the original model,
with every compressed layer's output ``Y`` exposed and a twin node that computes
``α·(W − Ŵ) x`` on the same input (``_residual_probe``), and the compressed model, whose layers
keep their output names. Differences are taken in float32 and summed in float64, so no float64
copies of large activations are made.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import onnx

from .factorize import reconstruct
from .graphs import FreshNames, attribute
from .records import CalibratedLayer, Calibration, OutputErrors
from .sessions import run_batches
from .surgery import Surgery
from .types import Discovery, Layer, Progress

__all__ = ["measure_output_errors", "node_weight"]


def node_weight(use: Layer, node: onnx.NodeProto, matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """``matrix`` (``f × c·κ``: a folded weight or a change of it) in the layout ``use``'s node
    reads as its weight, in the weight's element type, and whether that layout is ``Wᵀ``.

    The inverse of discovery's fold: a Conv's kernel shape; ``W`` itself for a ``Gather`` table
    or a Gemm with ``transB``; ``Wᵀ`` for a MatMul or a Gemm without it. The nodes of a tied
    weight may read it in different layouts (a table and its output MatMul).
    """
    dtype = onnx.helper.tensor_dtype_to_np_dtype(use.weight_dtype)
    if use.op_type == "Conv":
        return np.ascontiguousarray(matrix.reshape(use.weight_shape), dtype=dtype), False
    transposed = not (
        use.op_type == "Gather" or (use.op_type == "Gemm" and attribute(node, "transB", 0))
    )
    return np.ascontiguousarray(matrix.T if transposed else matrix, dtype=dtype), transposed


def _residual_probe(
    model: onnx.ModelProto,
    discovery: Discovery,
    layers: Mapping[str, CalibratedLayer],
) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with, for every layer, a twin node computing ``α·(W − Ŵ) x``, made
    through onnx-graphsurgeon (``surgery.Surgery``).

    The twin is the layer's own node (same op and attributes, so the same patches) with the
    residual weight ``W − Ŵ`` in the layout the node reads, and no bias; a tied weight gets a
    twin for each of its nodes. Returns the probe model and node name -> the twin's output.
    """
    import onnx_graphsurgeon as gs

    surgery = Surgery(model)
    graph = surgery.graph
    names = FreshNames(model)
    outputs = {}
    for layer in discovery.layers:
        if layer.name not in layers:
            continue
        residual = discovery.weight(layer) - reconstruct(layers[layer.name].factors)
        base = f"{layer.name}/onnx_lowrank_residual"
        stored_weights: dict[bool, gs.Constant] = {}  # tied uses share it per layout
        zero = None
        if layer.op_type == "Gemm":
            # Gemm's C is required before opset 11; a zero scalar (broadcast since opset 7) is
            # no bias in every opset
            dtype = onnx.helper.tensor_dtype_to_np_dtype(layer.weight_dtype)
            zero = surgery.constant(names.fresh(f"{base}_zero"), np.zeros((), dtype))
        for use in layer.uses():
            node = graph.nodes[use.node_index]
            stored, transposed = node_weight(use, model.graph.node[use.node_index], residual)
            if transposed not in stored_weights:
                stored_weights[transposed] = surgery.constant(names.fresh(f"{base}_weight"), stored)
            weight = stored_weights[transposed]
            if use.op_type == "Gather":
                inputs = [weight, node.inputs[1]]
            else:
                inputs = [node.inputs[0], weight, *([zero] if use.op_type == "Gemm" else [])]
            twin = gs.Node(
                node.op,
                names.fresh(base),
                dict(node.attrs),
                inputs,
                [gs.Variable(names.fresh(base))],
                domain=node.domain,
            )
            graph.nodes.append(twin)
            outputs[use.name] = twin.outputs[0].name
    return surgery.export(), outputs


class _OutputErrorSums:
    """Running sums for the two relative output errors of one layer."""

    def __init__(self, layer: Layer):
        self.channel_axis = 1 if layer.op_type == "Conv" else -1
        self.local = self.network = self.squares = 0.0
        self.channel_sums: dict[str, np.ndarray] = {}  # per node: the output's own mean
        self.counts: dict[str, int] = {}

    def add(
        self,
        use: str,
        shift: np.ndarray,
        original: np.ndarray,
        residual: np.ndarray,
        compressed: np.ndarray,
    ) -> None:
        """One batch of node ``use``; ``shift`` is its bias correction in output units."""
        # float32 differences, float64 sums: no float64 copies of large activations
        original = original.astype(np.float32, copy=False)
        axis = self.channel_axis % original.ndim
        shape = [1] * original.ndim
        shape[axis] = -1
        # Ŷ − Y of the layer alone: −(α(W − Ŵ)x − α(W − Ŵ)μ) once the bias is corrected
        local = residual.astype(np.float32) - shift.astype(np.float32).reshape(shape)
        network = compressed.astype(np.float32) - original
        self.local += _sum_of_squares(local)
        self.network += _sum_of_squares(network)
        self.squares += _sum_of_squares(original)
        others = tuple(a for a in range(original.ndim) if a != axis)
        sums = original.sum(axis=others, dtype=np.float64)
        self.channel_sums[use] = self.channel_sums.get(use, 0.0) + sums
        self.counts[use] = self.counts.get(use, 0) + original.size // original.shape[axis]

    def result(self) -> OutputErrors:
        # ‖Y − Ȳ‖², each node's output around its own per-channel mean
        spread = self.squares - sum(
            float(np.sum(total**2)) / max(self.counts[use], 1)
            for use, total in self.channel_sums.items()
        )

        def relative(value: float) -> float:
            if spread > 0:
                return math.sqrt(value / spread)
            return 0.0 if value == 0 else math.inf

        return OutputErrors(local=relative(self.local), network=relative(self.network))


def _sum_of_squares(array: np.ndarray) -> float:
    return float(np.sum(np.square(array), dtype=np.float64))


def measure_output_errors(
    calibration: Calibration,
    discovery: Discovery,
    compressed: onnx.ModelProto,
    layers: Mapping[str, CalibratedLayer],
    progress: Progress | None = None,
    *,
    compressed_dir: str | os.PathLike | None = None,
) -> dict[str, OutputErrors]:
    """Relative output errors of the compressed layers on the calibration data.

    Everything runs in ONNX Runtime, batch by batch: the original model, with every compressed
    layer's output ``Y`` exposed and a twin node that computes ``α·(W − Ŵ) x`` on the same
    input (``_residual_probe``), and the compressed model, whose layers keep their output
    names. Reports ``progress("output-error", samples_done, samples)``. ``compressed_dir``
    is the folder whose external data files hold the compressed model's weights, when they are
    not in memory (the original's is ``discovery.data_dir``).
    """
    graph = discovery.model.graph
    chosen = [layer for layer in discovery.layers if layer.name in layers]
    if not chosen:
        return {}
    probe, residuals = _residual_probe(discovery.model, discovery, layers)
    sums, wanted, outputs = {}, {}, []
    for layer in chosen:
        sums[layer.name] = _OutputErrorSums(layer)
        for use in layer.uses():
            node = graph.node[use.node_index]
            wanted[node.output[0]] = layer.weight_dtype
            wanted[residuals[use.name]] = layer.weight_dtype
            outputs.append(node.output[0])
    batches = run_batches(
        probe,
        wanted,
        calibration.feeds,
        calibration.providers,
        progress,
        stage="output-error",
        other=compressed,
        other_wanted=outputs,
        data_dir=discovery.data_dir,
        other_data_dir=compressed_dir,
    )
    for activations, others in batches:
        for layer in chosen:
            shifts = layers[layer.name].shifts
            for use in layer.uses():
                output = graph.node[use.node_index].output[0]
                sums[layer.name].add(
                    use.name,
                    shifts[use.name],
                    activations[output],
                    activations[residuals[use.name]],
                    others[output],
                )
    return {name: total.result() for name, total in sums.items()}
