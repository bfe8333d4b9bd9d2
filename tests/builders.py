"""Tiny ONNX models built with onnx.helper, and helpers to run and check them.

Every builder returns a one- or two-node model whose weight can be given exactly, so tests can
plant low-rank structure and check the rewrite to float tolerance.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
MODELS = Path(__file__).resolve().parent / "models"
MNIST = SAMPLES / "mnist_cnn.onnx"

FLOAT = TensorProto.FLOAT


def low_rank(rows: int, cols: int, rank: int, seed: int = 0, groups: int = 1) -> np.ndarray:
    """A float32 ``rows × cols`` matrix whose every column block of ``cols/groups`` has exactly
    rank ``rank`` (a sum of ``rank`` outer products per block)."""
    rng = np.random.default_rng(seed)
    width = cols // groups
    blocks = [
        rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, width))
        for _ in range(groups)
    ]
    return np.concatenate(blocks, axis=1).astype(np.float32)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str | None]]],
    outputs: Sequence[tuple[str, Sequence[int | str | None] | None]],
    initializers: Mapping[str, np.ndarray] = {},
    opset: int = 17,
    ir_version: int = 8,
    dtype: int = FLOAT,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(name, dtype, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, dtype, shape) for name, shape in outputs],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="tests",
        ir_version=ir_version,
    )
    # Outputs declared without a shape get the inferred one (the checker wants a shape field).
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


@functools.cache
def runtime_loads(ir_version: int, opset: int) -> bool:
    """Whether the installed ONNX Runtime loads a model of this IR version and default-domain
    opset (CI's second venv runs the oldest supported onnxruntime, 1.17: IR 9, opset 20)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", FLOAT, [1])],
        [helper.make_tensor_value_info("y", FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def conv_model(
    weight: np.ndarray,
    in_spatial: Sequence[int],
    bias: bool = True,
    batch: int | str = "N",
    seed: int = 0,
    **attributes,
) -> onnx.ModelProto:
    """``y = Conv(x, W[, B])`` for a weight of shape ``(f, c, k...)``."""
    f, c = weight.shape[:2]
    inits = {"W": weight}
    inputs = ["x", "W"]
    if bias:
        inits["B"] = np.random.default_rng(seed + 1).standard_normal(f).astype(weight.dtype)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attributes)
    return make_model([node], [("x", [batch, c, *in_spatial])], [("y", None)], inits)


def gemm_model(
    weight_b: np.ndarray,
    rows: int | str = "N",
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: np.ndarray | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """``y = alpha·A'·B' + beta·C`` with ``B`` the given constant."""
    c = weight_b.shape[1] if trans_b else weight_b.shape[0]
    inits = {"B": weight_b}
    inputs = ["a", "B"]
    if bias is not None:
        inits["C"] = bias
        inputs.append("C")
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    a_shape = [c, rows] if trans_a else [rows, c]
    return make_model([node], [("a", a_shape)], [("y", None)], inits, opset=opset)


def matmul_model(weight: np.ndarray, lead: Sequence[int | str]) -> onnx.ModelProto:
    """``y = x @ B`` for ``x`` of shape ``(*lead, c)`` and a constant ``B`` ``(c, f)``."""
    node = helper.make_node("MatMul", ["x", "B"], ["y"], name="matmul")
    return make_model([node], [("x", [*lead, weight.shape[0]])], [("y", None)], {"B": weight})


def if_model(taken: bool = True, seed: int = 0) -> onnx.ModelProto:
    """``x -> Conv "outer" -> If(cond)``: the then branch holds Conv "inner" (its weight an
    outer-scope initializer), the else branch an Identity; ``cond`` is a constant ``taken``,
    so ``taken=False`` never runs "inner"."""
    rng = np.random.default_rng(seed)
    shape = ["N", 16, 6, 6]
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["h", "W2"], ["t"], pads=[1, 1, 1, 1], name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, shape)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)],
    )
    cond = numpy_helper.from_array(np.array(taken))
    nodes = [
        helper.make_node("Constant", [], ["cond"], value=cond),
        helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], name="outer"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    weights = {
        "W1": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
        "W2": rng.standard_normal((16, 16, 3, 3)).astype(np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def rel_l2(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return float(np.linalg.norm(reference - candidate) / np.linalg.norm(reference))


def check_model(model: onnx.ModelProto) -> None:
    """The three checks every rewritten model gets: checker, shape inference, ORT loads it."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def random_feed(shape: Sequence[int], seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def total_weights(model: onnx.ModelProto) -> int:
    return sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type == FLOAT)


def mnist_images(count: int, split: str = "train_calib") -> np.ndarray:
    """The first ``count`` images of a shipped MNIST set (``samples/mnist_<split>.npz``), as the
    sample model reads them: ``(count, 1, 28, 28)`` float32, normalized."""
    images = np.load(SAMPLES / f"mnist_{split}.npz")["images"][:count].astype(np.float32) / 255.0
    return ((images - 0.1307) / 0.3081)[:, None]


def mnist_calibration(folder: Path, count: int) -> Path:
    """``folder/calibration.npz`` holding ``mnist_images(count)`` as the model's input."""
    path = folder / "calibration.npz"
    np.savez(path, input=mnist_images(count))
    return path


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]
