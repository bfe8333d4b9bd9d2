"""What earlier runs of onnx-lowrank recorded in a model's ``metadata_props``.

A model written by onnx-lowrank records its factorized layers under ``FACTORIZED_KEY`` and the
parameters folding removed under ``FOLDED_KEY``. Discovery reads them back, so those layers are
never factorized again and budgets stay fractions of the original model.
"""

from __future__ import annotations

import json
import logging
import math

import onnx

from .cost import node_macs
from .errors import InvalidModelError
from .types import FACTORIZED_KEY, FOLDED_KEY, FactorizedLayer, ShapeInfo
from .walk import walk_graphs

__all__ = ["factorized_layers", "folded_params"]

log = logging.getLogger(__name__)

#: Largest parameter count a ``FOLDED_KEY`` record may claim (beyond it, it is ignored).
_MAX_RECORDED_PARAMS = 2**53


def folded_params(model: onnx.ModelProto) -> int:
    """The ``FOLDED_KEY`` record: parameters folding removed in earlier runs (0 when absent or
    unreadable)."""
    text = next((p.value for p in model.metadata_props if p.key == FOLDED_KEY), None)
    if text is None:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_RECORDED_PARAMS:
        log.warning("ignoring unreadable %s metadata %r", FOLDED_KEY, text[:40])
        return 0
    return value


def factorized_layers(model: onnx.ModelProto, shapes: ShapeInfo) -> list[FactorizedLayer]:
    """The layers recorded under ``FACTORIZED_KEY`` whose second node is still in the model."""
    text = next((p.value for p in model.metadata_props if p.key == FACTORIZED_KEY), None)
    if text is None:
        return []
    try:
        entries = json.loads(text)
        records = [
            (
                str(e["name"]),
                [str(e["second"]), *map(str, e.get("tied", []))],
                _count(e["params_dense"]),
                _count(e["params"]),
            )
            for e in entries
        ]
        if sum(record[2] for record in records) > _MOST_PARAMS:
            raise ValueError("the recorded layers claim more than 2**40 original parameters")
        # r·(g·f + c·κ) >= f + c·κ >= 2·sqrt(f·c·κ): no factorization is smaller than that
        if any(dense > params * params // 4 for _, _, dense, params in records):
            raise ValueError("a layer's recorded dense size exceeds what its factors allow")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise InvalidModelError(
            f"the model's {FACTORIZED_KEY} metadata is unreadable ({reason}); it is written by "
            "onnx-lowrank and was damaged: remove that metadata entry from the model"
        ) from exc
    nodes = {node.name: node for _, graph in walk_graphs(model.graph) for node in graph.node}
    producers = {
        output: node
        for _, graph in walk_graphs(model.graph)
        for node in graph.node
        for output in node.output
    }
    found = []
    for name, seconds, params_dense, params in records:
        uses = [nodes.get(second) for second in seconds]
        if any(n is None or len(n.input) < 2 for n in uses) or params_dense <= params:
            log.warning("metadata names factorized layer %s, which is no longer there", name)
            continue
        positions: int | None = 0
        lookup_macs = 0
        for node in uses:  # the second node of each pair: P = its MACs / its weight size
            weight = shapes.get(node.input[1])  # type: ignore[union-attr]
            macs = node_macs(node, shapes)  # type: ignore[arg-type]
            if not weight or None in weight or macs is None or math.prod(weight) == 0:
                positions = None
                break
            first = producers.get(node.input[0])  # type: ignore[union-attr]
            if first is not None and first.op_type == "Gather":
                lookup_macs += macs  # after a lookup: the dense layer had no MACs
                continue
            positions += macs // math.prod(weight)  # type: ignore[operator, arg-type]
        found.append(FactorizedLayer(name, params_dense, params, positions, lookup_macs))
    return found


#: No ONNX layer has more weights than this (2**40: a 4 TiB float32 weight).
_MOST_PARAMS = 2**40


def _count(value: object) -> int:
    """A parameter count recorded in the metadata: an integer in [0, 2**40]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MOST_PARAMS:
        raise ValueError(f"parameter count {str(value)[:40]} is not an integer in [0, 2**40]")
    return value
