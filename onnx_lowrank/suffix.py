r"""Suffix probes: run only the part of a network downstream of one layer.

``--error network`` (sensitivity.py) measures a candidate of layer ``ℓ`` by what it does to the
network's outputs. Everything upstream of ``ℓ`` is the same for every candidate of ``ℓ``, so it
is computed once per layer and only the **suffix** runs per candidate:

* the suffix's nodes are ``ℓ``'s node and every main-graph node that reads (directly, or from
  inside its If/Loop/Scan bodies) a tensor one of them makes, in graph order;
* the **cut** is what those nodes read from upstream: ``ℓ``'s input, skip and residual tensors,
  branches that join later (graph inputs and initializers are read as they are; a ``Constant``
  node upstream is copied into the suffix instead);
* the suffix model has the cut tensors and the graph inputs its nodes read as inputs (an
  overridable initializer stays one: ``ℓ``'s weight and shift in the probe), the model outputs
  its nodes make as outputs, and the initializers its nodes (and their subgraphs) read. Model
  outputs that do not depend on ``ℓ`` are the reference's.

``SuffixProbes.runners`` takes the layers to measure in graph order, computes the cut tensors
of as many consecutive layers as fit in ``CUT_BYTES`` with one run of the model that exposes
them (``sessions.exposed``), and yields per layer a runner that feeds them, batch by batch, to
the layer's suffix session; a layer's cut tensors are released as soon as no later layer of the
group reads them. A layer falls back to the full probe (``None``, with the reason logged and
kept in ``fallbacks``) when it has tied uses, when a cut tensor's element type is unknown
(``discovery.shapes``; a shape that inference could not reach is measured by one run of the
model on one held-out sample), when its cut tensors alone exceed ``CUT_BYTES``, or when no
model output depends on it. It is also measured there when that is cheaper: once a layer's
suffix has been built and run, a later round (the refinement measures about one candidate per
layer) uses the suffix only if its measured build and run times beat as many passes of the
full probe; on a small model a session build costs more than a few full passes.

``onnx.utils.Extractor`` is not used: it walks back from the outputs along node inputs only,
so it drops the producers and initializers that only an If/Loop/Scan body reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .graphs import overridable_initializers
from .sessions import exposed, fixed_batch, make_session
from .types import Discovery
from .walk import iter_graphs

__all__ = ["CUT_BYTES", "Runner", "SuffixProbes", "downstream", "suffix_model"]

log = logging.getLogger(__name__)

#: Most bytes of cut tensors (all held-out samples) kept at once; a layer whose cut alone is
#: larger is measured on the full probe.
CUT_BYTES = 256 * 2**20

#: Runs a suffix on the held-out samples: overrides -> every model output (all samples).
Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


def _reads(node: onnx.NodeProto) -> set[str]:
    """Names ``node`` reads: its inputs, and every name read inside its subgraphs."""
    names = set(node.input)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for graph in graphs:
            for sub in iter_graphs(graph):
                for inner in sub.node:
                    names.update(inner.input)
    names.discard("")
    return names


def downstream(graph: onnx.GraphProto, start: set[str]) -> tuple[list[int], list[str], list[str]]:
    """The suffix of ``graph`` from the nodes that read any of the names ``start``.

    Returns:
        The suffix's node positions (graph order, ``Constant`` nodes it reads included), the
        cut (tensors made upstream that it reads), and the graph outputs it makes.
    """
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    reached: list[int] = []
    made: set[str] = set()
    read: set[str] = set()
    for position, node in enumerate(graph.node):
        reads = _reads(node)
        if reads & start or reads & made:
            reached.append(position)
            made.update(name for name in node.output if name)
            read |= reads
    cut = sorted(name for name in read - made if name in producer)
    constants = {producer[n] for n in cut if graph.node[producer[n]].op_type == "Constant"}
    cut = [name for name in cut if producer[name] not in constants]
    outputs = [info.name for info in graph.output if info.name in made]
    return sorted(set(reached) | constants), cut, outputs


def _value_info(name: str, batches: Sequence[np.ndarray]) -> onnx.ValueInfoProto:
    """An input for the cut tensor ``name`` with the shape its values have in every batch (a
    dimension that differs between batches is symbolic)."""
    shapes = [value.shape for value in batches]
    dims: list[int | str] = [
        sizes[0] if len(set(sizes)) == 1 else f"{name}_dim{axis}"
        for axis, sizes in enumerate(zip(*shapes, strict=True))
    ]
    elem_type = onnx.helper.np_dtype_to_tensor_dtype(batches[0].dtype)
    return onnx.helper.make_tensor_value_info(name, elem_type, dims)


def suffix_model(
    model: onnx.ModelProto,
    nodes: Sequence[int],
    cut: Mapping[str, Sequence[np.ndarray]],
    outputs: Sequence[str],
    overridable: set[str],
) -> onnx.ModelProto:
    """The suffix of ``model``: its ``nodes``, with the ``cut`` tensors (name -> values per
    batch, which give their types and shapes) and the graph inputs those nodes read as inputs,
    and ``outputs`` as outputs. Of the initializers that are also graph inputs, only the
    ``overridable`` ones stay inputs; the others become constants (ONNX Runtime may fold and
    pre-pack them)."""
    graph = model.graph
    read = set().union(*(_reads(graph.node[i]) for i in nodes)) if nodes else set()
    stored = {tensor.name for tensor in graph.initializer}
    read_inputs = read - (stored - overridable)
    suffix = onnx.ModelProto()
    suffix.ir_version = model.ir_version
    suffix.opset_import.extend(model.opset_import)
    suffix.functions.extend(model.functions)
    part = suffix.graph
    part.name = f"{graph.name or 'graph'}_suffix"
    part.node.extend(graph.node[i] for i in nodes)
    part.input.extend(_value_info(name, values) for name, values in cut.items())
    part.input.extend(info for info in graph.input if info.name in read_inputs)
    part.initializer.extend(tensor for tensor in graph.initializer if tensor.name in read)
    part.sparse_initializer.extend(
        sparse for sparse in graph.sparse_initializer if sparse.values.name in read
    )
    wanted = set(outputs)
    part.output.extend(info for info in graph.output if info.name in wanted)
    made = {name for i in nodes for name in graph.node[i].output}
    part.value_info.extend(info for info in graph.value_info if info.name in made)
    return suffix


@dataclass(frozen=True)
class _Plan:
    """A layer's suffix: node positions, cut tensors (with their bytes), outputs, and the
    inputs that stay overridable (the layer's weight and shift)."""

    nodes: list[int]
    cut: dict[str, int]
    outputs: list[str]
    start: set[str]


class SuffixProbes:
    """Suffix sessions of a probe model, one layer at a time (see the module docstring).

    Args:
        probe: the probe model (every layer's weight and shift overridable).
        discovery: the layers of the model the probe was made from (``discovery.model``, with
            the same tensor names, is run to expose the cuts; ``discovery.shapes`` gives their
            shapes, with a dynamic batch taken as 1, and element types).
        batches: the held-out samples, batch by batch, as the probe is run on them.
        reference: the probe's outputs with its defaults (all samples, per output).
        providers: ONNX Runtime execution providers.
        cut_bytes: most bytes of cut tensors kept at once (0: every layer on the full probe).
    """

    def __init__(
        self,
        probe: onnx.ModelProto,
        discovery: Discovery,
        batches: Sequence[Mapping[str, np.ndarray]],
        reference: Sequence[np.ndarray],
        providers: Sequence[str],
        cut_bytes: int = CUT_BYTES,
    ):
        self.probe, self.model, self.shapes = probe, discovery.model, discovery.shapes
        self.data_dir = discovery.data_dir  # weights of a lazily loaded model (load.py)
        self.overridable = set(overridable_initializers(discovery.model))
        batch = self.batch = fixed_batch(discovery.model)
        self.batches = [dict(b) for b in batches]
        self.reference = list(reference)
        self.outputs = [info.name for info in probe.graph.output]
        self.providers = list(providers)
        self.samples = sum(int(next(iter(b.values())).shape[0]) for b in self.batches)
        # discovery.shapes are at the model's fixed batch, else at the batch of the concrete
        # input shapes (--input-shape), else at batch 1
        given = {shape[0] for name, shape in discovery.shapes.input_shapes.items() if shape}
        given_batch = given.pop() if len(given) == 1 else 1
        self.per_shape = self.samples / (batch or given_batch)
        self.cut_bytes = cut_bytes
        self.fallbacks: dict[str, str] = {}
        self.seconds = {"cut": 0.0, "build": 0.0}
        self.cut_runs = 0  # passes of the held-out samples that exposed cut tensors
        self.suffix_layers = 0  # suffix sessions built
        self.in_full = 0  # times a layer was measured on the full probe as the cheaper way
        #: seconds of one full-probe pass over the held-out samples (set by the caller)
        self.full_seconds: float | None = None
        #: key -> (seconds to build its suffix session, seconds of its last suffix pass)
        self.costs: dict[str, tuple[float, float]] = {}
        #: shapes of cut tensors that shape inference could not reach, measured by running the
        #: model on one sample, or one batch when the model fixes it (``_measure_cuts``)
        self.measured: dict[str, tuple[int, ...]] = {}
        self._flows: dict[str, tuple[list[int], list[str], list[str]]] = {}

    def _downstream(self, key: str, start: set[str]) -> tuple[list[int], list[str], list[str]]:
        """``downstream`` of a layer's start names, computed once per layer (every measurement
        round plans the same layers again)."""
        if key not in self._flows:
            self._flows[key] = downstream(self.probe.graph, start)
        return self._flows[key]

    def _bytes(self, name: str) -> int | None:
        per_shape = self.per_shape
        if name in self.measured:  # measured on one sample, or one fixed batch
            shape, per_shape = self.measured[name], self.samples / (self.batch or 1)
        else:
            shape = self.shapes.get(name)
        elem_type = self.shapes.types.get(name)
        if shape is None or elem_type is None or any(d is None for d in shape):
            return None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
        return int(math.prod(shape) * itemsize * per_shape)

    def _plan(self, key: str, start: set[str], uses: int):
        """``(nodes, cut, outputs, bytes)`` of a layer's suffix, or the reason it has none."""
        if self.cut_bytes <= 0:
            return "suffix probes are off (no bytes for cut tensors)"
        if uses != 1:
            return "its weight is tied (several nodes read it)"
        if not start & {name for node in self.probe.graph.node for name in node.input}:
            return "it sits inside a subgraph (an If branch, a Loop or Scan body)"
        nodes, cut, outputs = self._downstream(key, start)
        if not outputs:
            return "no model output depends on it"
        sizes = {name: self._bytes(name) for name in cut}
        unknown = [name for name, size in sizes.items() if size is None]
        if unknown:
            return f"the shape or type of {unknown[0]!r} is unknown"
        total = sum(sizes.values())
        if total > self.cut_bytes:
            return f"its cut tensors take {total / 2**20:.0f} MiB (> {self.cut_bytes / 2**20:.0f})"
        return _Plan(nodes, sizes, outputs, start)

    def runners(
        self, layers: Sequence[tuple[str, set[str], int, int]]
    ) -> Iterator[tuple[str, Runner | None]]:
        """For each ``(key, names only ℓ's node reads, uses, candidates)``, given in graph
        order: ``(key, runner)``, or ``(key, None)`` where the layer is measured on the full
        probe (the reason in ``fallbacks``, unless the suffix would cost more: see
        ``_cheaper_in_full``). The pairs may come in another order."""
        self._measure_cuts(layers)
        group: list[tuple[str, _Plan]] = []
        held: dict[str, int] = {}
        for key, start, uses, count in layers:
            plan = self._plan(key, start, uses)
            if isinstance(plan, str):
                self.fallbacks[key] = plan
                log.info("network errors of %s on the full model: %s", key, plan)
                yield key, None
                continue
            if self._cheaper_in_full(key, count):
                self.in_full += 1
                yield key, None
                continue
            adding = {name: size for name, size in plan.cut.items() if name not in held}
            if group and sum(held.values()) + sum(adding.values()) > self.cut_bytes:
                yield from self._group(group)
                group, held, adding = [], {}, plan.cut
            group.append((key, plan))
            held.update(adding)
        yield from self._group(group)

    def _measure_cuts(self, layers: Sequence[tuple[str, set[str], int, int]]) -> None:
        """Measure the shapes of the layers' cut tensors that shape inference could not reach
        (computed from data, as the attention masks of a BERT export), by one run of the model
        that exposes them on the first held-out sample (the first batch when the model fixes
        its batch size). Their element types must be known; a run that fails leaves them
        unknown (those layers run on the full probe)."""
        if self.cut_bytes <= 0:
            return
        names: set[str] = set()
        for key, start, uses, _ in layers:
            if uses == 1:
                _, cut, outputs = self._downstream(key, start)
                if outputs:
                    names.update(n for n in cut if self._bytes(n) is None)
        wanted = {n: self.shapes.types[n] for n in sorted(names) if n in self.shapes.types}
        if not wanted:
            return
        first = self.batches[0]
        if self.batch is None:  # shapes are at batch 1
            first = {name: value[:1] for name, value in first.items()}
        started = time.perf_counter()
        try:
            values = self._expose(wanted, [first])
        except Exception as exc:  # custom ops, ...: the full probe still works
            log.info("could not measure the shapes of %d cut tensors: %s", len(wanted), exc)
            return
        finally:
            self.seconds["cut"] += time.perf_counter() - started
        for name, (value,) in values.items():
            self.measured[name] = tuple(int(d) for d in value.shape)

    def _expose(
        self, wanted: Mapping[str, int], batches: Sequence[Mapping[str, np.ndarray]]
    ) -> dict[str, list[np.ndarray]]:
        """The ``wanted`` tensors (name -> element type) of every batch, from one session of
        the model that exposes them as outputs."""
        session = make_session(
            exposed(self.model, wanted), self.providers, log_level=3, data_dir=self.data_dir
        )
        names = list(wanted)
        inputs = {info.name for info in session.get_inputs()}
        values: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for batch in batches:
            feed = {name: value for name, value in batch.items() if name in inputs}
            for name, value in zip(names, session.run(names, feed), strict=True):
                values[name].append(value)
        return values

    def _cheaper_in_full(self, key: str, count: int) -> bool:
        """Whether ``count`` candidates of a layer measured on a suffix before would cost
        less on the full probe: its suffix session's build and runs, as measured, against
        ``count`` runs of the full probe (the refinement measures one candidate per layer)."""
        if key not in self.costs or self.full_seconds is None:
            return False
        build, run = self.costs[key]
        return build + count * run >= count * self.full_seconds

    def _group(self, group: list[tuple[str, _Plan]]) -> Iterator[tuple[str, Runner]]:
        if not group:
            return
        started = time.perf_counter()
        wanted = {name: self.shapes.types[name] for _, plan in group for name in plan.cut}
        values: dict[str, list[np.ndarray]] = {}
        if wanted:
            values = self._expose(wanted, self.batches)
            self.cut_runs += 1
        self.seconds["cut"] += time.perf_counter() - started
        last = {name: position for position, (_, plan) in enumerate(group) for name in plan.cut}
        for position, (key, plan) in enumerate(group):
            cut_values = {name: values[name] for name in plan.cut}
            yield key, self._runner(key, plan, cut_values)
            for name in plan.cut:  # released once no later layer of the group reads it
                if last[name] == position:
                    del values[name]

    def _runner(self, key: str, plan: _Plan, cut: Mapping[str, list[np.ndarray]]) -> Runner:
        started = time.perf_counter()
        overridable = plan.start | self.overridable
        model = suffix_model(self.probe, plan.nodes, cut, plan.outputs, overridable)
        session = make_session(model, self.providers, data_dir=self.data_dir)
        build = time.perf_counter() - started
        self.seconds["build"] += build
        self.suffix_layers += 1
        inputs = {info.name for info in model.graph.input}
        del model
        feeds = [
            {
                **{name: value for name, value in batch.items() if name in inputs},
                **{name: values[index] for name, values in cut.items()},
            }
            for index, batch in enumerate(self.batches)
        ]
        outputs = list(plan.outputs)
        positions = [self.outputs.index(name) for name in outputs]

        def run(overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
            begun = time.perf_counter()
            parts = [session.run(outputs, {**feed, **overrides}) for feed in feeds]
            self.costs[key] = (build, time.perf_counter() - begun)
            result = list(self.reference)
            for column, position in enumerate(positions):
                result[position] = np.concatenate([part[column] for part in parts])
            return result

        return run
