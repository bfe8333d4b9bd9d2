"""Report records made from an analysis: graph inputs and outputs, where the parameters are
(``parameter_shares``, ``embedding_tables``), one ``LayerReport`` per layer (factorized, kept
dense or skipped) in graph order, and the notes on shapes and earlier runs.
"""

from __future__ import annotations

import math
from dataclasses import replace

import onnx

from .cost import count_parameters
from .graphs import FLOAT_TYPES, attribute, type_name
from .index import GraphIndex
from .records import (
    KEPT_DENSE,
    CalibratedLayer,
    LayerReport,
    OutputErrors,
    ParameterShares,
    TensorInfo,
)
from .spectra import error_table
from .types import (
    Analysis,
    CandidateTable,
    Discovery,
    GraphPath,
    Layer,
    LayerSpectrum,
    SkippedLayer,
    UserChoice,
)
from .walk import walk_graphs

__all__ = [
    "dense_record",
    "embedding_tables",
    "history_notes",
    "in_graph_order",
    "layer_records",
    "parameter_shares",
    "report_output_errors",
    "shape_notes",
    "skipped_record",
    "tensor_info",
]


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


def layer_records(
    discovery: Discovery,
    tables: list[CandidateTable],
    choices: list[int],
    spectra: dict[str, LayerSpectrum],
    errors: dict[str, float | None],
    user: dict[str, UserChoice],
) -> list[LayerReport]:
    """One record per layer: factorized at its chosen row (with the error bound of its
    spectrum and the actual error in ``errors``), or kept dense with the reason; then one per
    skipped node."""
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
            records.append(replace(dense_record(layer, reason), user_choice=by_user))
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
    records += [skipped_record(skipped) for skipped in discovery.skipped]
    return records


def _macs_after(layer: Layer, params: int, rank: int) -> int | None:
    """MACs of the factorized layer with ``params`` weights (added biases included)."""
    positions = layer.mac_positions()
    if positions is None:
        return None
    return params * positions[0] + rank * layer.cols * positions[1]


def dense_record(layer: Layer, reason: str | None) -> LayerReport:
    """The record of a layer kept dense (``reason`` None in an inspection)."""
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


def skipped_record(skipped: SkippedLayer) -> LayerReport:
    """The record of a node discovery skipped, with its reason."""
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


def in_graph_order(layers: list[LayerReport], model: onnx.ModelProto) -> list[LayerReport]:
    """``layers`` in the order of their nodes in the main graph; those of subgraphs last."""
    order = {node.name or f"{node.op_type}_{i}": i for i, node in enumerate(model.graph.node)}
    return sorted(layers, key=lambda layer: order.get(layer.name, len(order)))


def shape_notes(discovery: Discovery, unknown: list[str]) -> list[str]:
    """The shapes discovery assumed, and the nodes whose MACs are unknown."""
    notes = list(discovery.shapes.assumed)
    if unknown:
        notes.append(
            f"MACs unknown (dynamic shapes) for {len(unknown)} node(s): "
            + ", ".join(unknown[:5])
            + ("..." if len(unknown) > 5 else "")
        )
    return notes


def history_notes(analysis: Analysis) -> list[str]:
    """A note when an earlier onnx-lowrank run compressed the input."""
    discovery = analysis.discovery
    if not discovery.factorized:
        return []
    original = analysis.params_total + discovery.params_saved
    return [
        f"the input was compressed before by onnx-lowrank ({len(discovery.factorized)} "
        f"factorized layer(s)); budgets are fractions of its original {original:,} parameters"
    ]


def report_output_errors(
    layer: LayerReport,
    calibrated: dict[str, CalibratedLayer],
    measured: dict[str, OutputErrors],
) -> LayerReport:
    """``layer`` with the output errors of its calibrated factors: the estimate, and the
    errors validation measured (``measured``, when it ran)."""
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
