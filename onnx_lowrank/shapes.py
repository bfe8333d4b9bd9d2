"""Shapes of a model's tensors, for MAC counts and the layers' output positions.

Shapes come from ONNX shape inference on a light copy of the model (large weights replaced by
typed graph inputs), with dynamic input dimensions fixed by the user's ``input_shapes``. A leading
(batch) dimension left dynamic is taken as 1, so MACs are per sample; it does not change any MAC
*fraction*. Any other dynamic dimension stays unknown, unless one ONNX Runtime run on zero
inputs measures it (``_probe_shapes``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx

from .cost import MAC_OPS
from .errors import ConfigError, RuntimeMissingError
from .graphs import FLOAT_TYPES, attribute
from .sessions import make_session, runtime
from .types import Shape, ShapeInfo
from .walk import iter_graphs

__all__ = ["infer_shapes"]

log = logging.getLogger(__name__)

#: Largest model whose missing shapes are measured by running it once (it is copied to do so).
_PROBE_BYTES = 512 * 2**20


#: Most input values of that run (absurd declared shapes are not allocated).
_PROBE_INPUT_VALUES = 2**26


#: Initializers with at most this many elements are kept in the shape-inference copy, so that
#: shape tensors (Reshape targets and the like) still propagate.
_SMALL_TENSOR = 64


def infer_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]) -> ShapeInfo:
    """Shapes of every tensor ONNX shape inference can reach.

    Args:
        model: the model. It is not modified.
        input_shapes: concrete shapes for graph inputs, overriding what the model declares.

    Raises:
        ConfigError: an ``input_shapes`` name is not a graph input, or its rank is wrong.
    """
    light = _light_copy(model)
    assumed = _fix_input_shapes(light.graph, model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:  # custom ops or broken models: fall back to declared shapes only
        log.warning("shape inference failed (%s); MACs of some layers are unknown", exc)
        inferred = light
    shapes: dict[str, Shape] = {}
    for graph in iter_graphs(inferred.graph):
        for info in (*graph.input, *graph.value_info, *graph.output):
            shape = _shape_of(info)
            if shape is not None:
                shapes[info.name] = shape
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            shapes[tensor.name] = tuple(tensor.dims)
    initializers = {tensor.name for tensor in model.graph.initializer}
    concrete = {
        info.name: shapes[info.name]
        for info in model.graph.input
        if info.name not in initializers
        and info.name in shapes
        and all(d is not None for d in shapes[info.name])
    }
    missing = _unknown_mac_tensors(model.graph, shapes)
    real_inputs = [i for i in model.graph.input if i.name not in initializers]
    if missing and len(concrete) == len(real_inputs):
        probed = _probe_shapes(model, concrete, missing, _element_types(inferred.graph))
        shapes.update(probed)
        if probed:
            assumed.append(
                f"shapes of {len(probed)} tensor(s) that shape inference could not reach were "
                "measured by running the model once in ONNX Runtime"
            )
    types = {}
    for graph in iter_graphs(inferred.graph):
        types.update(_element_types(graph))
    return ShapeInfo(shapes=shapes, assumed=tuple(assumed), input_shapes=concrete, types=types)


def _unknown_mac_tensors(graph: onnx.GraphProto, shapes: Mapping[str, Shape]) -> list[str]:
    """Main-graph data inputs and outputs of MAC ops whose shapes are not fully known."""
    names = []
    for node in graph.node:
        if node.op_type in MAC_OPS and node.domain in ("", "ai.onnx") and node.input:
            for name in (node.input[0], node.output[0]):
                shape = shapes.get(name)
                if name and (shape is None or None in shape) and name not in names:
                    names.append(name)
    return names


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {
        info.name: info.type.tensor_type.elem_type
        for info in (*graph.input, *graph.value_info, *graph.output)
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type
    }


def _probe_shapes(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    names: list[str],
    types: Mapping[str, int],
) -> dict[str, Shape]:
    """Shapes of ``names``, measured by one ONNX Runtime run on zero inputs of the given shapes.

    Shape inference stops at shapes computed from data (for example the pads that PyTorch
    exports compute with Shape/Slice/Concat chains); running the graph does not. Returns {}
    when the model cannot run that way (no ONNX Runtime, weights still on disk, a model over
    ``_PROBE_BYTES``, custom ops, inputs whose values matter).
    """
    try:
        runtime()
    except RuntimeMissingError:
        return {}
    if model.ByteSize() > _PROBE_BYTES or any(
        onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer
    ):
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)
        )
    if sum(math.prod(shape) for shape in input_shapes.values()) > _PROBE_INPUT_VALUES:
        return {}
    try:
        feeds = {
            info.name: np.zeros(
                input_shapes[info.name],
                dtype=onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type),
            )
            for info in model.graph.input
            if info.name in input_shapes
        }
        session = make_session(probe, ["CPUExecutionProvider"])
        values = session.run(names, feeds)
    except Exception as exc:  # the model needs real inputs, custom ops, ...: shapes stay unknown
        log.info("could not run the model to measure shapes (%s)", " ".join(str(exc).split())[:200])
        return {}
    return {
        name: tuple(int(d) for d in value.shape) for name, value in zip(names, values, strict=True)
    }


def _shape_of(info: onnx.ValueInfoProto) -> Shape | None:
    if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return tuple(
        dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
        for dim in info.type.tensor_type.shape.dim
    )


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference in which large initializers and large main-graph Constant
    nodes are graph inputs with their type and shape only, so inference costs little memory
    on large models."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    source = model.graph
    graph.name = source.name
    graph.input.extend(source.input)
    for node in source.node:
        value = attribute(node, "value") if node.op_type == "Constant" else None
        if (
            isinstance(value, onnx.TensorProto)
            and value.data_type in FLOAT_TYPES
            and math.prod(value.dims) > _SMALL_TENSOR
            and len(node.output) == 1
        ):  # a large Constant-node weight (paddle2onnx): only its type and shape matter here
            graph.input.append(
                onnx.helper.make_tensor_value_info(node.output[0], value.data_type, value.dims)
            )
        else:
            graph.node.append(node)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {info.name for info in source.input}
    for tensor in source.initializer:
        if tensor.data_type not in FLOAT_TYPES or math.prod(tensor.dims) <= _SMALL_TENSOR:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return light


def _fix_input_shapes(
    graph: onnx.GraphProto, model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    real_inputs = [
        info
        for info in graph.input
        if info.name in {i.name for i in model.graph.input} and info.name not in initializers
    ]
    names = {info.name for info in real_inputs}
    for name in input_shapes:
        if name not in names:
            raise ConfigError(
                f"--input-shape names {name!r}, which is not a graph input; inputs are: "
                + ", ".join(sorted(names))
            )
    assumed = []
    for info in real_inputs:
        dims = info.type.tensor_type.shape.dim
        if info.name in input_shapes:
            shape = input_shapes[info.name]
            if info.type.tensor_type.HasField("shape") and len(dims) != len(shape):
                raise ConfigError(
                    f"--input-shape gives {len(shape)} dimensions for {info.name!r}, "
                    f"which has rank {len(dims)}"
                )
            del info.type.tensor_type.shape.dim[:]
            for size in shape:
                info.type.tensor_type.shape.dim.add().dim_value = size
        elif dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            label = dims[0].dim_param or ("?" if not dims[0].HasField("dim_value") else "-1")
            dims[0].Clear()
            dims[0].dim_value = 1
            assumed.append(
                f"{info.name}: dynamic batch dimension {label!r} taken as 1 for MAC counts"
            )
    return assumed
