"""Reading and writing models: typed errors for bad files, external data (eager and lazy), and
atomic writes that never touch the input's files."""

from __future__ import annotations

import os
import signal

import numpy as np
import onnx
import pytest
from builders import MNIST, low_rank, make_model, random_feed
from onnx import helper
from robust_helpers import assert_close, file_hashes, outputs

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank import load as load_module
from onnx_lowrank.errors import InvalidModelError, ModelFileError, OutputPathError
from onnx_lowrank.graphs import tensor_to_array
from onnx_lowrank.load import (
    external_data_files,
    load_model,
    model_file_size,
    open_model,
    save_model,
)


def two_layer_model() -> onnx.ModelProto:
    """Conv → Flatten → MatMul with weights large enough to go to external data."""
    conv = low_rank(16, 8 * 9, 4, seed=1).reshape(16, 8, 3, 3)
    dense = low_rank(24, 16 * 16, 5, seed=2).T.copy()
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "D"], ["y"], name="dense"),
    ]
    return make_model(nodes, [("x", ["N", 8, 4, 4])], [("y", None)], {"W": conv, "D": dense})


def external_model(folder, name="model.onnx", data="model.onnx.data"):
    """``two_layer_model`` saved with its weights in ``folder/data``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(
        two_layer_model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data,
        size_threshold=0,
    )
    return path


FEEDS = {"x": random_feed([2, 8, 4, 4])}


# bad files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, ModelFileError, "not found"),
        ("dir", ModelFileError, "is a directory"),
        (b"", InvalidModelError, "empty"),
        (b"\x08\x07" + b"\xff" * 64, InvalidModelError, "not an ONNX model"),
        ("truncated", InvalidModelError, "not an ONNX model"),
        ("plain-text", InvalidModelError, "not an ONNX model"),
    ],
)
def test_bad_files_raise_typed_errors(tmp_path, content, error, message):
    path = tmp_path / "model.onnx"
    if content == "dir":
        path.mkdir()
    elif content == "truncated":
        path.write_bytes(MNIST.read_bytes()[:10_000])
    elif content == "plain-text":
        path.write_text("x = 1\n" * 100)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_model(path)


def test_checker_failure_needs_force(tmp_path, caplog):
    model = two_layer_model()
    model.graph.node[2].input[0] = "does_not_exist"  # reads a name nothing produces
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match=r"fails the ONNX checker.*--force"):
        load_model(path)
    with caplog.at_level("WARNING", logger="onnx_lowrank"):
        assert load_model(path, force=True).graph.node[2].input[0] == "does_not_exist"
    assert "going on because of --force" in caplog.text


# external data --------------------------------------------------------------------------------


def test_missing_external_data_file(tmp_path):
    path = external_model(tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    for lazy in (False, True):
        with pytest.raises(InvalidModelError, match=r"'model.onnx.data'.* is missing"):
            open_model(path, lazy=lazy)


def test_truncated_external_data_file(tmp_path):
    path = external_model(tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InvalidModelError, match="truncated or belongs to another model"):
        load_model(path)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    external_model(tmp_path / "elsewhere")
    model = onnx.load(tmp_path / "elsewhere" / "model.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere/model.onnx.data"
    (tmp_path / "here").mkdir()
    path = tmp_path / "here" / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(path)


def test_external_data_from_bytes_is_refused(tmp_path):
    path = external_model(tmp_path)
    with pytest.raises(InvalidModelError, match="pass the path"):
        load_model(path.read_bytes())


def test_lazy_loading_reads_the_same_weights(tmp_path):
    path = external_model(tmp_path)
    eager, lazy = open_model(path, lazy=False), open_model(path, lazy=True)
    assert not eager.lazy and lazy.lazy and lazy.data_dir == tmp_path
    assert eager.data_files == lazy.data_files == ((tmp_path / "model.onnx.data").resolve(),)
    for before, after in zip(
        eager.model.graph.initializer, lazy.model.graph.initializer, strict=True
    ):
        assert not before.external_data and after.external_data
        np.testing.assert_array_equal(tensor_to_array(before), tensor_to_array(after, tmp_path))


@pytest.mark.parametrize("lazy", [False, True])
def test_compressing_external_data_keeps_external_data_and_the_input(tmp_path, monkeypatch, lazy):
    """The output follows the input (external data), lands in the input's own folder with the
    default data file name of the input, and never writes the input's files."""
    if lazy:
        monkeypatch.setattr(load_module, "LAZY_EXTERNAL_BYTES", 0)
    path = external_model(tmp_path, name="net.onnx", data="out.onnx.data")
    before = file_hashes(tmp_path)
    result = compress(path, CompressionConfig(params=0.5, latency_runs=1))
    assert result.report.validation.passed
    assert (result.data_dir is not None) == lazy
    written = result.save(tmp_path / "out.onnx")  # out.onnx.data is the input's data file
    assert file_hashes(tmp_path / "net.onnx", tmp_path / "out.onnx.data") == before
    assert external_data_files(written) == ((tmp_path / "out.onnx.1.data").resolve(),)
    assert result.report.size_bytes_after == model_file_size(written)
    assert_close(result.model if not lazy else written, written, FEEDS, tolerance=1e-6)
    inline = result.save(tmp_path / "inline.onnx", external_data=False)
    assert external_data_files(inline) == ()
    assert_close(written, inline, FEEDS, tolerance=1e-6)


def test_lazy_and_eager_compression_give_the_same_model(tmp_path, monkeypatch):
    path = external_model(tmp_path)
    eager = compress(path, CompressionConfig(params=0.5, validate=False))
    monkeypatch.setattr(load_module, "LAZY_EXTERNAL_BYTES", 0)
    lazy = compress(path, CompressionConfig(params=0.5, validate=False))
    assert lazy.data_dir is not None  # weights stay on disk (in a spill folder)
    eager.save(tmp_path / "eager.onnx")
    lazy.save(tmp_path / "lazy.onnx")
    reference = outputs(tmp_path / "eager.onnx", FEEDS)[0]
    np.testing.assert_array_equal(outputs(tmp_path / "lazy.onnx", FEEDS)[0], reference)


def test_large_outputs_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(load_module, "PROTOBUF_LIMIT", 10_000)  # stands in for 2 GiB
    written = save_model(two_layer_model(), tmp_path / "big.onnx")
    assert external_data_files(written) == ((tmp_path / "big.onnx.data").resolve(),)
    assert_close(two_layer_model(), written, FEEDS, tolerance=0)


# atomic writes --------------------------------------------------------------------------------


def test_interrupted_write_leaves_the_old_output_and_no_temporary_files(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous output")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(load_module, "_write_streaming", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(two_layer_model(), target, external_data=True)
    assert target.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_ctrl_c_between_the_renames_is_held_back(tmp_path, monkeypatch):
    """SIGINT arriving while the data file and the model are renamed takes effect after both."""
    real_replace = os.replace

    def replace_with_interrupt(source, target):
        real_replace(source, target)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(load_module.os, "replace", replace_with_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_model(two_layer_model(), tmp_path / "out.onnx", external_data=True)
    monkeypatch.undo()
    assert_close(two_layer_model(), tmp_path / "out.onnx", FEEDS, tolerance=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]


def test_output_paths_that_cannot_be_written(tmp_path):
    model = two_layer_model()
    with pytest.raises(OutputPathError, match="does not exist"):
        save_model(model, tmp_path / "missing" / "out.onnx")
    with pytest.raises(OutputPathError, match="is a directory"):
        save_model(model, tmp_path)
    protected = tmp_path / "input.onnx.data"
    protected.write_bytes(b"weights")
    with pytest.raises(OutputPathError, match="file of the input model"):
        save_model(model, protected, protect=[protected])
    assert protected.read_bytes() == b"weights"
