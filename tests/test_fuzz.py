"""Fuzzing: mutated model bytes and protobuf fields give a valid compressed model or one of our
typed errors, never another exception.

The suite runs a small seeded subset (100 cases). For the long run (results in docs/robustness.md):

    ONNX_LOWRANK_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz.py -q -p no:cacheprovider

Mutations: truncation, bit flips, overwritten byte runs, and field edits of the parsed model
(wrong or absurd dims, missing or absurd attributes, changed element types, op types, inputs,
opsets and IR versions, removed initializers, duplicated nodes, absurd input shapes); the
external-data entries of a model saved with a data file (location, offset, length, unknown
keys) and the data file itself (truncated, a folder, a link, a FIFO); metadata
(``onnx_lowrank.factorized`` records with absurd, deeply nested or non-numeric values, and
other keys); and option values, both as ``CompressionConfig`` fields and as command lines
(values of every type, output paths that are the input, a folder or a FIFO), where the exit
code must be 0, 2 or 3.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
from onnx_lowrank.cli import main
from onnx_lowrank.cli_options import build_parser
from onnx_lowrank.types import FACTORIZED_KEY

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
    return mutate_bytes(draw, SEEDS[draw(st.sampled_from(sorted(SEEDS)))])


def mutate_bytes(draw, data: bytes) -> bytes:
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


# external data, metadata and options ---------------------------------------------------------

DATA = "model.onnx.data"


def _external_seeds() -> dict[str, tuple[bytes, bytes]]:
    """Seed models saved with every tensor in one data file: (model bytes, data bytes)."""
    seeds = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("conv_net", "tied", "gemm"):
            model = onnx.ModelProto()
            model.ParseFromString(SEEDS[name])
            path = Path(folder) / f"{name}.onnx"
            onnx.save_model(
                model, path, save_as_external_data=True, location=DATA, size_threshold=0
            )
            seeds[name] = (path.read_bytes(), (Path(folder) / DATA).read_bytes())
            (Path(folder) / DATA).unlink()
    return seeds


EXTERNAL_SEEDS = _external_seeds()

LOCATIONS = [
    "",
    DATA + "/",
    "../" + DATA,
    "/etc/passwd",
    "a\0b",
    "x" * 300,
    "d/" * 2100,
    "missing.data",
    "model.onnx",
    "link.data",
    "folder",
    "fifo",
    ".",
    DATA,
]
NUMBERS = ["-1", "0", "1", "7", "abc", "1e3", "", " 5", "99999999999999999999", str(2**63)]


def external_entries(draw, model):
    """Edit one external tensor's entries: location, offset, length, unknown or missing keys."""
    tensors = [t for t in model.graph.initializer if t.external_data]
    tensor = _pick(draw, tensors)
    if tensor is None:
        return
    action = draw(st.sampled_from(["location", "offset", "length", "unknown", "drop", "clear"]))
    entries = {entry.key: entry.value for entry in tensor.external_data}
    if action in ("location", "offset", "length"):
        values = LOCATIONS if action == "location" else NUMBERS
        entries[action] = draw(st.one_of(st.sampled_from(values), st.text(max_size=12)))
    elif action == "unknown":
        entries[draw(st.text(min_size=1, max_size=8))] = draw(st.text(max_size=8))
    elif action == "drop" and entries:
        del entries[draw(st.sampled_from(sorted(entries)))]
    else:
        entries = {}
    del tensor.external_data[:]
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


FACTORIZED_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([10**30, 2**40, 1e400, 0, -1, "12", None, [], {}, True]),
)


def factorized_metadata(draw, model):
    """An ``onnx_lowrank.factorized`` record: valid-looking entries with absurd values, JSON of
    another shape, deep nesting, or not JSON."""
    names = [n.name for n in model.graph.node] + ["missing"]
    kind = draw(st.sampled_from(["records", "json", "deep", "text"]))
    if kind == "records":
        records = []
        for _ in range(draw(st.integers(0, 3))):
            record = {
                "name": draw(st.sampled_from(names)),
                "second": draw(st.sampled_from(names)),
                "groups": draw(FACTORIZED_VALUES),
                "rank": draw(FACTORIZED_VALUES),
                "params_dense": draw(FACTORIZED_VALUES),
                "params": draw(FACTORIZED_VALUES),
            }
            if draw(st.booleans()):
                record["tied"] = draw(st.lists(st.sampled_from(names), max_size=2))
            if draw(st.booleans()):
                del record[draw(st.sampled_from(sorted(record)))]
            records.append(record)
        text = json.dumps(records, allow_nan=True).replace("1e+400", "1e400")
    elif kind == "json":
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=10,
        )
        text = json.dumps(draw(json_values))
    elif kind == "deep":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        text = "[" * depth + "]" * depth
    else:
        text = draw(st.text(max_size=40))
    onnx.helper.set_model_props(model, {FACTORIZED_KEY: text})


def other_metadata(draw, model):
    key = draw(st.text(max_size=20))
    value = draw(st.text(max_size=60))
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value


OPTION_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**65), 2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from([0.5, 1, 2, "all", "svd", "alds", "bound", "cpu", "cuda", "output"]),
)

OPTION_FIELDS = [
    "params",
    "flops",
    "method",
    "error",
    "max_groups",
    "groups",
    "rank_multiple",
    "device",
    "max_rel_error",
    "min_cosine",
    "min_top1",
    "latency_runs",
    "seed",
    "fold_batchnorm",
    "input_shapes",
    "inputs",
    "calibration",
]


@dataclass
class Case:
    """One fuzz case: a model (bytes), files beside it, and how it is run."""

    model: bytes
    files: dict[str, bytes | str] = field(default_factory=dict)  # bytes, "dir", "fifo", "link"
    options: dict[str, object] | None = None  # CompressionConfig fields (CONFIG when None)
    argv: list[str] | None = None  # a command line instead of the API


@st.composite
def mutated_cases(draw) -> Case:
    kind = draw(st.sampled_from(["bytes"] * 5 + ["external", "metadata", "options", "argv"]))
    name = draw(st.sampled_from(sorted(SEEDS)))
    if kind == "bytes":
        return Case(mutate_bytes(draw, SEEDS[name]))
    if kind == "external":
        model_bytes, data = EXTERNAL_SEEDS[draw(st.sampled_from(sorted(EXTERNAL_SEEDS)))]
        model = onnx.ModelProto()
        model.ParseFromString(model_bytes)
        for _ in range(draw(st.integers(0, 2))):
            external_entries(draw, model)
        files: dict[str, bytes | str] = {DATA: data, "link.data": "link", "fifo": "fifo"}
        files["folder"] = "dir"
        damage = draw(st.sampled_from(["none", "truncate", "empty", "dir", "link", "fifo"]))
        if damage == "truncate":
            files[DATA] = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
        elif damage == "empty":
            files[DATA] = b""
        elif damage != "none":
            files[DATA] = damage
            files["target.data"] = data
        return Case(model.SerializeToString(), files)
    model = onnx.ModelProto()
    model.ParseFromString(SEEDS[name])
    if kind == "metadata":
        draw(st.sampled_from([factorized_metadata, other_metadata]))(draw, model)
        return Case(model.SerializeToString())
    if kind == "options":
        options = dict(params=0.5, latency_runs=1, max_groups=2)
        for key in draw(st.lists(st.sampled_from(OPTION_FIELDS), min_size=1, max_size=3)):
            options[key] = draw(OPTION_VALUES)
        return Case(model.SerializeToString(), options=options)
    return Case(
        model.SerializeToString(),
        files={"folder": "dir", "fifo": "fifo"},
        argv=draw(command_lines()),
    )


def _flags() -> list[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    flags = set()
    for sub in commands.choices.values():
        for action in sub._actions:
            flags.update(o for o in action.option_strings if o not in ("-h", "--help"))
    return sorted(flags - {"--version"})


FLAGS = _flags()
PATHS = [
    "out.onnx",
    "model.onnx",
    DATA,
    "out.onnx.data",
    "folder",
    "fifo",
    "missing/x.onnx",
    "r.json",
    "p.png",
    "model",
]


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(["compress", "inspect", "sweep"]))
    argv = [command, "model.onnx"]
    if command == "compress":
        argv += ["-o", draw(st.sampled_from(PATHS))]
    elif command == "sweep":
        argv += ["--out", draw(st.sampled_from(["sweep", "folder", "model.onnx", "fifo"]))]
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(FLAGS))
        if draw(st.integers(0, 9)) == 0:  # an abbreviation
            flag = flag[: draw(st.integers(3, max(3, len(flag) - 1)))]
        value = draw(
            st.one_of(
                st.sampled_from(PATHS),
                st.sampled_from(["0.5", "1", "0", "-1", "1.5", "nan", "inf", "all", "x:1,2"]),
                st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6),
            )
        )
        argv += [flag, value] if draw(st.booleans()) else [flag]
    if command != "inspect" and draw(st.integers(0, 3)):
        argv += ["--params", "0.5"]
    return [*argv, "--latency-runs", "1", "-q"] if command != "inspect" else [*argv, "-q"]


def check_case(case: Case) -> str:
    """The outcome of one case, like ``check_outcome``; the input's files are never changed."""
    if case.options is None and not case.files and case.argv is None:
        return check_outcome(case.model)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = root / "model.onnx"
        path.write_bytes(case.model)
        for name, content in case.files.items():
            if isinstance(content, bytes):
                (root / name).write_bytes(content)
            elif content == "dir":
                (root / name).mkdir()
            elif content == "fifo":
                os.mkfifo(root / name)
            else:  # a link to the real data
                (root / name).symlink_to("target.data" if name == DATA else DATA)
        before = _hashes(root)
        if case.argv is not None:
            outcome = _run_command(case.argv, root)
        else:
            outcome = _run_api(path, case.options)
        if case.argv is not None and "--overwrite" in case.argv:
            before.pop("model.onnx", None)  # asked to replace the input
        after = _hashes(root)
        assert {k: v for k, v in after.items() if k in before} == before, "input files changed"
        return outcome


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.name in ("model.onnx", DATA, "target.data")
    }


def _run_api(path: Path, options: dict[str, object] | None) -> str:
    try:
        config = CONFIG if options is None else CompressionConfig(**options)
    except OnnxLowRankError:
        return "typed"
    with contextlib.suppress(OnnxLowRankError):
        inspect(path, config)
    try:
        result = compress(path, config)
    except OnnxLowRankError:
        return "typed"
    onnx.checker.check_model(result.model)
    validation = result.report.validation
    if validation is not None and not validation.passed:
        with pytest.raises(ValidationFailedError):
            result.save(path.parent / "out.onnx")
        return "refused"
    try:
        result.save(path.parent / "out.onnx")
    except OnnxLowRankError:
        return "typed"
    return "compressed"


def _run_command(argv: list[str], folder: Path) -> str:
    """Run the CLI in ``folder``; exit code 1 (an internal error) fails."""
    previous = Path.cwd()
    stderr = io.StringIO()
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.chdir(previous)
    assert code in (0, 2, 3), f"exit {code} for {argv}: {stderr.getvalue()}"
    lines = stderr.getvalue().strip().splitlines()
    assert code == 0 or (lines and lines[-1].startswith("onnx-lowrank:")), (argv, lines)
    return {0: "compressed", 2: "typed", 3: "refused"}[code]


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
@given(mutated_cases())
def test_mutated_models_compress_or_raise_typed_errors(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy on absurd values
        warnings.simplefilter("ignore", UserWarning)  # onnx on unknown external-data keys
        outcome = check_case(case)
    assert outcome in ("typed", "compressed", "refused")


def test_seed_models_compress():
    for data in SEEDS.values():
        assert check_outcome(data) == "compressed"
