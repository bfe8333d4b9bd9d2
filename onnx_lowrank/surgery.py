"""Graph surgery on onnx-graphsurgeon, without losing what a round trip drops.

``Surgery`` opens a model as an onnx-graphsurgeon ``Graph`` for the passes that edit graphs (the
rewrite into factor pairs) and exports it back with what a graphsurgeon round trip would lose
carried across from the original (docs/design.md, "Graph surgery").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .types import GraphPath
from .walk import iter_graphs, iter_tensors

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = ["Surgery"]

#: NodeProto fields that an onnx-graphsurgeon round trip drops (``overload`` and
#: ``device_configurations`` exist from IR version 10 and 11 on, in the onnx versions that know
#: them).
_NODE_EXTRAS = tuple(
    name
    for name in ("doc_string", "metadata_props", "overload", "device_configurations")
    if name in onnx.NodeProto.DESCRIPTOR.fields_by_name
)


#: What the nodes that replace a node inherit from it.
_INHERITED = ("doc_string", "metadata_props")


#: Attribute types onnx-graphsurgeon imports; it drops the others (sparse tensors, type protos,
#: lists of tensors or graphs) with a warning.
_GS_ATTRIBUTE_TYPES = frozenset(
    {
        onnx.AttributeProto.FLOAT,
        onnx.AttributeProto.INT,
        onnx.AttributeProto.STRING,
        onnx.AttributeProto.TENSOR,
        onnx.AttributeProto.GRAPH,
        onnx.AttributeProto.FLOATS,
        onnx.AttributeProto.INTS,
        onnx.AttributeProto.STRINGS,
    }
)


class Surgery:
    """A model opened as an onnx-graphsurgeon ``Graph`` for editing, and exported back with what
    a graphsurgeon round trip loses carried across from the original.

    ``gs.import_onnx`` followed by ``gs.export_onnx`` drops the model's ``doc_string``,
    ``domain``, ``model_version``, ``metadata_props`` and ``training_info``, node doc strings and
    ``metadata_props``, attributes of types it cannot import, graph ``metadata_props``, and
    initializers listed as graph inputs (required below IR version 4, an input's default value
    from version 4 on); it rebuilds inputs, outputs and ``value_info`` from its own tensor
    records (losing denotations and doc strings), lists initializers in the order nodes read
    them, and moves an outer-scope initializer that only a subgraph reads into that subgraph.
    ``export`` restores all of it from the original model, so a round trip without edits gives
    back the original model. Local functions are carried over as they are (graph passes do not
    edit them).

    The original model is read, never modified: the graph's constants are ``LazyValues`` over
    the original's tensors (external data is not read), and ``export`` copies them into the new
    model. Nodes that replace a node get its doc string and ``metadata_props`` through
    ``inherit``.
    """

    def __init__(self, model: onnx.ModelProto):
        import onnx_graphsurgeon as gs
        from onnx_graphsurgeon.logger import G_LOGGER

        self.model = model
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):  # its warnings go to stdout
            self.graph: gs.Graph = gs.import_onnx(model)
        # export_onnx appends to import_domains: give it a list, not the model's own field
        self.graph.import_domains = list(model.opset_import)
        # id(graphsurgeon node or graph) -> (that object, its original proto); the object is
        # kept so that an id is never reused while the Surgery lives.
        self._originals: dict[int, tuple[object, onnx.NodeProto | onnx.GraphProto]] = {}
        self._inherited: dict[int, tuple[object, onnx.NodeProto]] = {}
        self._stored: dict[int, tuple[gs.Constant, np.dtype]] = {}  # see constant()
        self._pair(self.graph, model.graph)

    def _pair(self, graph: gs.Graph, proto: onnx.GraphProto) -> None:
        self._originals[id(graph)] = (graph, proto)
        for node, node_proto in zip(graph.nodes, proto.node, strict=True):
            self._originals[id(node)] = (node, node_proto)
            for attr in node_proto.attribute:
                if attr.type == onnx.AttributeProto.GRAPH and attr.name in node.attrs:
                    self._pair(node.attrs[attr.name], attr.g)

    def subgraph(self, path: GraphPath) -> gs.Graph:
        """The graph at ``path`` (``walk_graphs``), read before node lists are edited.

        Raises:
            ValueError: the path runs through an attribute graphsurgeon does not import (a
                list of graphs, which no standard operator has).
        """
        graph = self.graph
        for position, name, _ in path:
            node = graph.nodes[position]
            if name not in node.attrs:
                raise ValueError(
                    f"node {node.name!r} holds its subgraph {name!r} in a list of graphs, "
                    "which onnx-graphsurgeon cannot edit"
                )
            graph = node.attrs[name]
        return graph

    def _original(self, item) -> onnx.NodeProto | onnx.GraphProto | None:
        entry = self._originals.get(id(item))
        return entry[1] if entry is not None and entry[0] is item else None

    def constant(self, name: str, values: np.ndarray, dtype=None) -> gs.Constant:
        """A new constant that ``export`` writes as ``values`` in ``dtype`` (default: their
        own). The values are converted and copied only then, one tensor at a time, so a view of
        a larger array costs nothing before."""
        import onnx_graphsurgeon as gs

        values = np.asarray(values)
        constant = gs.Constant(name, values)
        self._stored[id(constant)] = (constant, np.dtype(dtype or values.dtype))
        return constant

    def inherit(self, nodes: Iterable[gs.Node], source: gs.Node) -> None:
        """Let ``nodes``, which replace ``source``, inherit its doc string and
        ``metadata_props``."""
        proto = self._original(source)
        if proto is None:
            entry = self._inherited.get(id(source))
            proto = entry[1] if entry is not None and entry[0] is source else None
        if proto is not None:
            for node in nodes:
                self._inherited[id(node)] = (node, proto)

    def export(self) -> onnx.ModelProto:
        """The edited model: ``gs.export_onnx`` of the graph, with what it drops restored."""
        import onnx_graphsurgeon as gs
        from onnx_graphsurgeon.logger import G_LOGGER

        shadowed = self._shadow_constants()
        try:
            with G_LOGGER.suppress(G_LOGGER.CRITICAL):
                exported = gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for constant, values, _ in shadowed.values():
                constant._values = values
        self._restore_graph(self.graph, exported.graph, {})
        self._restore_model(exported)
        for tensor in iter_tensors(exported):
            entry = shadowed.get(tensor.raw_data) if tensor.HasField("raw_data") else None
            if entry is not None:
                _fill(tensor, entry[0], entry[2])
        return exported

    def _shadow_constants(self) -> dict[bytes, tuple[gs.Constant, object, object]]:
        """Give every constant a data-less stand-in for the export; return each stand-in's
        marker (its ``raw_data``) with the constant, its values, and what ``_fill`` writes
        (``LazyValues``, or an array with the type to store it in).

        ``gs.export_onnx`` copies each weight twice (``make_graph``, then ``make_model``) and
        turns arrays into bytes first, and it renames the original's tensors in place: with
        stand-ins it copies a few bytes per constant, and ``_fill`` copies each weight once
        into the exported model. Constants that graphsurgeon converts on export
        (``export_dtype``) and sparse ones keep their values.
        """
        import onnx_graphsurgeon as gs
        from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
        from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

        constants: dict[int, gs.Constant] = {}
        for graph in [self.graph, *self.graph.subgraphs(recursive=True)]:
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Constant):
                    constants[id(tensor)] = tensor
            for node in graph.nodes:
                for value in node.attrs.values():
                    if isinstance(value, gs.Constant):
                        constants[id(value)] = value
        shadowed = {}
        for constant in constants.values():
            values = constant._values
            if isinstance(values, SparseValues) or (
                isinstance(values, np.ndarray) and constant.export_dtype != constant.dtype
            ):
                continue
            marker = f"\0onnx-lowrank stand-in {len(shadowed)}".encode()
            stand_in = onnx.TensorProto(name=constant.name, raw_data=marker)
            if isinstance(values, np.ndarray):
                entry = self._stored.get(id(constant))
                dtype = entry[1] if entry is not None and entry[0] is constant else values.dtype
                stand_in.data_type = dtype_to_onnx(dtype)
                stand_in.dims.extend(values.shape)
                if constant.data_location is not None:
                    stand_in.data_location = constant.data_location
                values = (values, dtype)
            lazy = object.__new__(LazyValues)  # what the exporter reads: .tensor
            lazy.tensor, lazy.shape, lazy.dtype = stand_in, constant.shape, constant.dtype
            shadowed[marker] = (constant, constant._values, values)
            constant._values = lazy
        return shadowed

    def _restore_model(self, exported: onnx.ModelProto) -> None:
        original = self.model
        for field in onnx.ModelProto.DESCRIPTOR.fields:
            if field.name not in ("graph", "opset_import"):
                _copy_field(exported, original, field.name)
        # the original imports, then any domain a new node brought (``ai.onnx`` is ``""``)
        domains = {entry.domain for entry in original.opset_import}
        if domains & {"", "ai.onnx"}:
            domains |= {"", "ai.onnx"}
        added = [_copied(e) for e in exported.opset_import if e.domain not in domains]
        exported.ClearField("opset_import")
        exported.opset_import.extend(original.opset_import)
        exported.opset_import.extend(added)

    def _restore_graph(
        self, graph: gs.Graph, proto: onnx.GraphProto, outer: dict[str, onnx.GraphProto]
    ) -> None:
        """Restore ``proto`` (the export of ``graph``) and its subgraphs. ``outer`` maps the
        original initializers of the enclosing graphs to the exported graph that holds them."""
        original = self._original(graph)
        own = set() if original is None else set(_initializer_names(original))
        # An outer-scope initializer that only this subgraph reads was exported into it: move
        # it back to the graph that defines it.
        for position in reversed(range(len(proto.initializer))):
            name = proto.initializer[position].name
            if name in outer and name not in own:
                home = outer[name]
                if name not in set(_initializer_names(home)):
                    home.initializer.add().CopyFrom(proto.initializer[position])
                del proto.initializer[position]
        scope = {**outer, **dict.fromkeys(own, proto)}
        for node, node_proto in zip(graph.nodes, proto.node, strict=True):
            self._restore_node(node, node_proto)
            for attr in node_proto.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    self._restore_graph(node.attrs[attr.name], attr.g, scope)
        if original is not None:
            self._restore_lists(proto, original)

    def _restore_lists(self, proto: onnx.GraphProto, original: onnx.GraphProto) -> None:
        if "metadata_props" in onnx.GraphProto.DESCRIPTOR.fields_by_name:
            _copy_field(proto, original, "metadata_props")
        if proto.doc_string == original.doc_string:  # set or unset, as it was
            _copy_field(proto, original, "doc_string")
        tensors = {tensor.name: tensor for tensor in original.initializer}
        exported_inputs = {info.name for info in proto.input}
        present = set(_initializer_names(proto))
        inputs = []
        for info in original.input:
            if info.name in exported_inputs or info.name in present:
                inputs.append(info)
            elif info.name in tensors and self.model.ir_version >= 4:
                # an input's default value stays with its input, read or not
                proto.initializer.add().CopyFrom(tensors[info.name])
                inputs.append(info)
        named = {info.name for info in original.input}
        inputs += [_copied(info) for info in proto.input if info.name not in named]
        _replace(proto.input, inputs)
        # initializers in the original order, then the new ones in the order nodes read them
        order = {name: i for i, name in enumerate(_initializer_names(original))}
        proto.initializer.sort(key=lambda tensor: order.get(tensor.name, len(order)))
        proto.sparse_initializer.sort(key=lambda sparse: order.get(sparse.values.name, len(order)))
        outputs = {info.name: info for info in original.output}
        _replace(proto.output, [outputs.get(info.name) or _copied(info) for info in proto.output])
        # value_info: the original entries but those of tensors the edit removed, then the
        # exported entries of new tensors this graph produces (not those of outer-scope names)
        gone = _names(original) - _names(proto)
        produced = {name for node in proto.node for name in node.output}
        described = {info.name for info in original.value_info}
        infos = [info for info in original.value_info if info.name not in gone]
        infos += [
            _copied(info)
            for info in proto.value_info
            if info.name not in described and info.name in produced
        ]
        _replace(proto.value_info, infos)

    def _restore_node(self, node: gs.Node, proto: onnx.NodeProto) -> None:
        original = self._original(node)
        if original is None:
            entry = self._inherited.get(id(node))
            if entry is not None and entry[0] is node:
                for name in _INHERITED:
                    _copy_field(proto, entry[1], name)
            return
        for name in _NODE_EXTRAS:
            _copy_field(proto, original, name)
        if original.op_type != proto.op_type:
            return
        kept = {attr.name: attr for attr in original.attribute}
        for attr in proto.attribute:
            before = kept.get(attr.name)
            if before is None:
                continue
            if before.HasField("doc_string"):
                attr.doc_string = before.doc_string
        exported = {attr.name for attr in proto.attribute}
        dropped = {
            attr.name
            for attr in original.attribute
            if attr.name not in exported and attr.type not in _GS_ATTRIBUTE_TYPES
        }
        if dropped:  # put them back where they were
            current = {attr.name: _copied(attr) for attr in proto.attribute}
            attributes = [
                kept[attr.name] if attr.name in dropped else current.pop(attr.name)
                for attr in original.attribute
                if attr.name in dropped or attr.name in current
            ]
            _replace(proto.attribute, attributes + list(current.values()))


def _fill(tensor: onnx.TensorProto, constant: gs.Constant, values) -> None:
    """Put the data of ``constant`` into its exported stand-in: ``values`` is an
    ``(array, dtype)`` pair, or ``LazyValues`` over a tensor of the original model (copied with
    its external data references, if any)."""
    if isinstance(values, tuple):
        array, dtype = values
        tensor.raw_data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        return
    tensor.CopyFrom(values.tensor)
    if constant.name != values.tensor.name:
        tensor.name = constant.name


def _names(graph: onnx.GraphProto) -> set[str]:
    """The names a graph and its subgraphs read or produce."""
    names = {info.name for info in graph.input} | {info.name for info in graph.output}
    for sub in iter_graphs(graph):
        for node in sub.node:
            names.update(node.input)
            names.update(node.output)
    return names


def _initializer_names(graph: onnx.GraphProto) -> list[str]:
    names = [tensor.name for tensor in graph.initializer]
    return names + [sparse.values.name for sparse in graph.sparse_initializer]


def _copied(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _replace(container, items) -> None:
    """Set a repeated message field to ``items`` (copies; the field is cleared first)."""
    items = [_copied(item) for item in items]
    del container[:]
    container.extend(items)


def _copy_field(target, source, name: str) -> None:
    """Make field ``name`` of ``target`` what it is in ``source``: set or unset, as it is."""
    target.ClearField(name)
    value = getattr(source, name)
    field = source.DESCRIPTOR.fields_by_name[name]
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:  # protobuf before 5.28
        repeated = field.label == field.LABEL_REPEATED
    if repeated:
        getattr(target, name).extend(value)
    elif source.HasField(name):
        if field.message_type is not None:
            getattr(target, name).CopyFrom(value)
        else:
            setattr(target, name, value)
