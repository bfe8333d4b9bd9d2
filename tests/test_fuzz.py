"""Fuzzing: mutated model bytes and protobuf fields give a valid compressed model or one of our
typed errors, never another exception.

The suite runs a small seeded subset (100 cases). For the long run (results in docs/robustness.md):

    ONNX_LOWRANK_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

Mutations: truncation, bit flips, overwritten byte runs, and field edits of the parsed model
(wrong or absurd dims, missing or absurd attributes, changed element types, op types, inputs,
opsets and IR versions, removed initializers, duplicated nodes, absurd input shapes).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from builders import MNIST, MODELS, low_rank, make_model
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from test_robustness import if_model

from onnx_lowrank import (
    CompressionConfig,
    OnnxLowRankError,
    ValidationFailedError,
    compress,
    inspect,
)

EXAMPLES = int(os.environ.get("ONNX_LOWRANK_FUZZ_EXAMPLES", "100"))
LONG_RUN = EXAMPLES > 100

CONFIG = CompressionConfig(params=0.5, latency_runs=1, max_groups=2)


def seed_models() -> dict[str, bytes]:
    conv = low_rank(6, 4 * 9, 2, seed=1).reshape(6, 4, 3, 3)
    dense = low_rank(5, 6 * 9, 2, seed=2).T.copy()
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "D"], ["y"], name="dense"),
    ]
    conv_net = make_model(
        nodes,
        [("x", ["N", 4, 3, 3])],
        [("y", None)],
        {"W": conv, "B": np.ones(6, np.float32), "D": dense},
    )
    gemm = make_model(
        [helper.make_node("Gemm", ["a", "G", "C"], ["y"], name="gemm", transB=1, alpha=0.5)],
        [("a", [3, 8])],
        [("y", None)],
        {"G": low_rank(7, 8, 2, seed=3), "C": np.zeros(7, np.float32)},
        opset=11,
    )
    tied = make_model(  # one weight, two Convs: factorized once (Layer.tied)
        [
            helper.make_node("Conv", ["x", "T"], ["a"], name="tied_a", pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["a", "T", "B"], ["y"], name="tied_b", strides=[2, 2]),
        ],
        [("x", ["N", 6, 5, 5])],
        [("y", None)],
        {"T": low_rank(6, 6 * 9, 2, seed=4).reshape(6, 6, 3, 3), "B": np.ones(6, np.float32)},
    )
    seeds = {
        "conv_net": conv_net.SerializeToString(),
        "tied": tied.SerializeToString(),
        "gemm": gemm.SerializeToString(),
        "if_subgraphs": if_model().SerializeToString(),
    }
    if LONG_RUN:
        seeds["mnist"] = MNIST.read_bytes()
        seeds["silero_vad"] = (MODELS / "silero_vad.onnx").read_bytes()
    return seeds


SEEDS = seed_models()

Mutation = Callable[[st.DrawFn, onnx.ModelProto], None]


def _pick(draw, items):
    return items[draw(st.integers(0, len(items) - 1))] if len(items) else None


ABSURD = st.sampled_from([0, -1, 1, 2, 3, 7, 2**31, 2**40, -(2**40)])


def wrong_dims(draw, model):
    tensor = _pick(draw, model.graph.initializer)
    if tensor is None:
        return
    dims = list(tensor.dims)
    action = draw(st.sampled_from(["set", "append", "drop", "clear"]))
    if action == "set" and dims:
        dims[draw(st.integers(0, len(dims) - 1))] = draw(ABSURD)
    elif action == "append":
        dims.append(draw(ABSURD))
    elif action == "drop" and dims:
        dims.pop()
    elif action == "clear":
        dims = []
    del tensor.dims[:]
    tensor.dims.extend(dims)


def missing_attribute(draw, model):
    node = _pick(draw, [n for n in model.graph.node if n.attribute])
    if node is not None:
        del node.attribute[draw(st.integers(0, len(node.attribute) - 1))]


def absurd_attribute(draw, model):
    node = _pick(draw, list(model.graph.node))
    if node is None:
        return
    name = draw(st.sampled_from(["group", "transB", "transA", "axis", "pads", "strides", "perm"]))
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    value = draw(st.one_of(ABSURD, st.lists(ABSURD, min_size=1, max_size=5)))
    node.attribute.append(helper.make_attribute(name, value))


def element_type(draw, model):
    tensor = _pick(draw, model.graph.initializer)
    if tensor is not None:
        tensor.data_type = draw(st.sampled_from([0, 1, 2, 6, 7, 10, 11, 16, 17, 999]))


def op_type(draw, model):
    node = _pick(draw, list(model.graph.node))
    if node is not None:
        node.op_type = draw(
            st.sampled_from(["Conv", "Gemm", "MatMul", "ConvTranspose", "Relu", "If", "Nope"])
        )


def rewire(draw, model):
    node = _pick(draw, list(model.graph.node))
    if node is None or not node.input:
        return
    names = [t.name for t in model.graph.initializer] + [
        o for n in model.graph.node for o in n.output
    ]
    position = draw(st.integers(0, len(node.input) - 1))
    node.input[position] = draw(st.sampled_from([*names, "", "missing"]))


def drop_initializer(draw, model):
    if model.graph.initializer:
        del model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]


def duplicate_node(draw, model):
    node = _pick(draw, list(model.graph.node))
    if node is not None:
        model.graph.node.append(node)


def absurd_input_shape(draw, model):
    info = _pick(draw, list(model.graph.input))
    if info is None:
        return
    dims = info.type.tensor_type.shape.dim
    if dims:
        dim = dims[draw(st.integers(0, len(dims) - 1))]
        dim.Clear()
        choice = draw(st.one_of(ABSURD, st.just("sym")))
        if choice == "sym":
            dim.dim_param = "S"
        else:
            dim.dim_value = choice


def versions(draw, model):
    if draw(st.booleans()):
        model.opset_import[0].version = draw(st.sampled_from([0, 1, 6, 8, 9, 99]))
    else:
        model.ir_version = draw(st.sampled_from([1, 2, 3, 4, 99]))


def weight_values(draw, model):
    tensor = _pick(draw, [t for t in model.graph.initializer if t.data_type == 1])
    if tensor is None:
        return
    try:
        array = numpy_helper.to_array(tensor).copy()
    except ValueError:  # dims already broken by an earlier mutation
        return
    if array.size:
        array.flat[draw(st.integers(0, array.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 1e38, 0.0])
        )
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


FIELD_MUTATIONS: list[Mutation] = [
    wrong_dims,
    missing_attribute,
    absurd_attribute,
    element_type,
    op_type,
    rewire,
    drop_initializer,
    duplicate_node,
    absurd_input_shape,
    versions,
    weight_values,
]


@st.composite
def mutated_models(draw) -> bytes:
    data = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "fields"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        array = bytearray(data)
        for bit in draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8)):
            array[bit // 8] ^= 1 << (bit % 8)
        return bytes(array)
    if kind == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=32))
        return data[:start] + chunk + data[start + len(chunk) :]
    model = onnx.ModelProto()
    model.ParseFromString(data)
    for _ in range(draw(st.integers(1, 3))):
        draw(st.sampled_from(FIELD_MUTATIONS))(draw, model)
    return model.SerializeToString()


def check_outcome(data: bytes) -> str:
    """``"typed"`` for one of our errors, ``"compressed"`` for a valid compressed model,
    ``"refused"`` for a model that failed validation (it cannot be saved); any other exception
    propagates and fails the test."""
    with contextlib.suppress(OnnxLowRankError):
        inspect(data)
    try:
        result = compress(data, CONFIG)
    except OnnxLowRankError:
        return "typed"
    onnx.checker.check_model(result.model)
    validation = result.report.validation
    assert validation is not None
    if not validation.passed:
        # Refused: the report says why and saving raises our typed ValidationFailedError
        # (e.g. weights near the float32 limit whose factors overflow to Inf).
        assert validation.failures
        with pytest.raises(ValidationFailedError):
            result.save(os.devnull)
        return "refused"
    assert math.isfinite(result.report.max_error_actual)
    return "compressed"


@seed(20261128)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(mutated_models())
def test_mutated_models_compress_or_raise_typed_errors(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy on absurd values
        outcome = check_outcome(data)
    assert outcome in ("typed", "compressed", "refused")


def test_seed_models_compress():
    for data in SEEDS.values():
        assert check_outcome(data) == "compressed"
