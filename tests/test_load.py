"""Reading and writing models: typed errors for bad files, external data (eager and lazy), and
atomic writes that never touch the input's files."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import MNIST, low_rank, make_model, random_feed
from onnx import helper
from robust_helpers import assert_close, file_hashes, outputs

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank import load as load_module
from onnx_lowrank import save as save_module
from onnx_lowrank.data import load_npz
from onnx_lowrank.errors import (
    CalibrationError,
    InvalidModelError,
    ModelFileError,
    OutputPathError,
)
from onnx_lowrank.graphs import tensor_to_array
from onnx_lowrank.load import external_data_files, load_model, model_file_size, open_model
from onnx_lowrank.save import save_model
from onnx_lowrank.validate import validation_inputs

ROOT = Path(__file__).resolve().parent.parent


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
    monkeypatch.setattr(save_module, "PROTOBUF_LIMIT", 10_000)  # stands in for 2 GiB
    written = save_model(two_layer_model(), tmp_path / "big.onnx")
    assert external_data_files(written) == ((tmp_path / "big.onnx.data").resolve(),)
    assert_close(two_layer_model(), written, FEEDS, tolerance=0)


# atomic writes --------------------------------------------------------------------------------


def test_interrupted_write_leaves_the_old_output_and_no_temporary_files(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous output")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(save_module, "_write_streaming", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(two_layer_model(), target, external_data=True)
    assert target.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def _signal_this_thread(number: int) -> None:
    """Send ``number`` to the calling (main) thread. ``os.kill`` on the own process may deliver
    it to any thread (ONNX Runtime and BLAS pools of earlier tests are alive), and Python then
    runs the handler only when the main thread next checks, possibly after the renames: the
    hold-back is then not exercised and the test would be racy."""
    signal.pthread_kill(threading.get_ident(), number)


def test_ctrl_c_between_the_renames_is_held_back(tmp_path, monkeypatch):
    """SIGINT arriving while the data file and the model are renamed takes effect after both."""
    real_replace = os.replace

    def replace_with_interrupt(source, target):
        real_replace(source, target)
        _signal_this_thread(signal.SIGINT)

    monkeypatch.setattr(save_module.os, "replace", replace_with_interrupt)
    # Python's own Ctrl-C handler, whatever the suite inherited: a shell starts background jobs
    # with SIGINT ignored, and Python then keeps SIG_IGN.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_model(two_layer_model(), tmp_path / "out.onnx", external_data=True)
    finally:
        signal.signal(signal.SIGINT, previous)
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


def test_a_crash_between_the_renames_leaves_the_old_model_with_its_old_weights(
    tmp_path, monkeypatch
):
    """Fault injection: the process dies after the data file is renamed into place and before
    the model is. The old model must still load and compute with its own weights."""
    target = tmp_path / "out.onnx"
    old = two_layer_model()
    save_model(old, target, external_data=True)
    expected = outputs(target, FEEDS)[0]
    new = two_layer_model()
    for tensor in new.graph.initializer:  # other weights, same shapes and data file size
        tensor.raw_data = (2 * onnx.numpy_helper.to_array(tensor)).tobytes()
    real_replace = os.replace
    calls = []

    def crash_after_the_first_rename(source, destination):
        if calls:
            raise OSError(5, "simulated crash")
        calls.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(save_module.os, "replace", crash_after_the_first_rename)
    with pytest.raises(OutputPathError, match="simulated crash"):
        save_model(new, target, external_data=True)
    monkeypatch.undo()
    assert calls and calls[0] != tmp_path / "out.onnx.data"  # the old data file is untouched
    np.testing.assert_array_equal(load_model(target) and outputs(target, FEEDS)[0], expected)
    # The next write replaces the orphan and removes the old data file once it is published.
    save_model(new, target, external_data=True)
    np.testing.assert_allclose(outputs(target, FEEDS)[0], 2 * 2 * expected, rtol=1e-5)
    assert external_data_files(target) == ((tmp_path / "out.onnx.1.data").resolve(),)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.1.data"]


def test_rewriting_an_output_alternates_data_files_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "out.onnx"
    names = []
    for _ in range(3):
        save_model(two_layer_model(), target, external_data=True)
        names.append(sorted(p.name for p in tmp_path.iterdir()))
        target.chmod(0o640)
    first, second = ["out.onnx", "out.onnx.data"], ["out.onnx", "out.onnx.1.data"]
    assert names == [first, second, first]
    assert target.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out.onnx.data").stat().st_mode & 0o777 == 0o640
    save_model(two_layer_model(), target)  # inline now: the old data file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert target.stat().st_mode & 0o777 == 0o640
    assert_close(two_layer_model(), target, FEEDS, tolerance=0)


def test_a_data_file_of_another_name_is_never_removed(tmp_path):
    """Only data files named after the output are the output's own; others may be shared."""
    shared = external_model(tmp_path, name="out.onnx", data="weights.bin")
    save_model(two_layer_model(), shared, external_data=True)
    assert (tmp_path / "weights.bin").exists()
    assert external_data_files(shared) == ((tmp_path / "out.onnx.data").resolve(),)


def test_written_models_must_pass_the_checker(tmp_path, caplog):
    broken = two_layer_model()
    broken.graph.node[2].input[0] = "nowhere"
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous output")
    with pytest.raises(InvalidModelError, match=r"fails the ONNX checker.*nothing was written"):
        save_model(broken, target)
    assert target.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    with caplog.at_level("WARNING", logger="onnx_lowrank"):
        save_model(broken, target, force=True)
    assert "because of --force" in caplog.text
    assert onnx.load(target).graph.node[2].input[0] == "nowhere"


@pytest.mark.parametrize("kind", ["fifo", "directory", "link to fifo", "link to directory"])
def test_special_files_are_never_replaced(tmp_path, kind):
    special = tmp_path / "special"
    if "fifo" in kind:
        os.mkfifo(special)
    else:
        special.mkdir()
    target = special
    if kind.startswith("link"):
        target = tmp_path / "link.onnx"
        target.symlink_to(special)
    expected = "named pipe" if "fifo" in kind else "directory"
    with pytest.raises(OutputPathError, match=f"is a {expected}.*not a regular file"):
        save_model(two_layer_model(), target)
    assert special.is_fifo() if "fifo" in kind else special.is_dir()
    assert target.is_symlink() == kind.startswith("link")


def test_dev_null_stays_a_device():
    """As root, renaming onto /dev/null would replace the system's null device."""
    before = os.stat("/dev/null")
    with pytest.raises(OutputPathError, match="is a character device"):
        save_model(two_layer_model(), "/dev/null")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_sigterm_between_the_renames_is_held_back(tmp_path, monkeypatch):
    """SIGTERM, like SIGINT, takes effect after both files are in place."""
    real_replace = os.replace
    delivered = []

    def replace_with_sigterm(source, target):
        real_replace(source, target)
        _signal_this_thread(signal.SIGTERM)

    def handler(number, frame):
        delivered.append(number)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(save_module.os, "replace", replace_with_sigterm)
        with pytest.raises(KeyboardInterrupt):
            save_model(two_layer_model(), tmp_path / "out.onnx", external_data=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert delivered == [signal.SIGTERM]
    assert_close(two_layer_model(), tmp_path / "out.onnx", FEEDS, tolerance=0)


def test_temporaries_of_a_killed_process_are_removed_by_the_next_write(tmp_path):
    """A writer killed with SIGKILL between the renames leaves its staging folder; the next write
    to that folder removes it (the pid in its name is dead), and never one of a live process."""
    script = (
        "import os, signal, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_load import two_layer_model\n"
        "from onnx_lowrank import save\n"
        "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"save.save_model(two_layer_model(), {str(tmp_path / 'out.onnx')!r}, external_data=True)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx.")]
    assert len(stale) == 1 and (stale[0] / "out.onnx.data").exists()
    live = tmp_path / f"{save_module.temporary_prefix('.out.onnx')}live"
    live.mkdir()  # this process is alive: its folder stays
    save_model(two_layer_model(), tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.onnx", "out.onnx.data", live.name]
    )


# locations onnx or the file system refuse ------------------------------------------------------


def relocated_model(folder, location, make=None):
    """``external_model`` whose tensors name ``location``; ``make(folder)`` adds files."""
    path = external_model(folder)
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    if make is not None:
        make(folder)
    return path


def link_data(folder):
    os.symlink("model.onnx.data", folder / "link.data")


@pytest.mark.parametrize(
    ("location", "make", "message"),
    [
        ("link.data", link_data, "is a symbolic link"),
        ("model.onnx.data/", None, "ends in a path separator"),
        ("model\0.data", None, "holds a NUL byte"),
        ("x" * 300, None, "is too long (300 bytes in one name"),
        ("d/" * 2100 + "x", None, "is too long (4201 bytes; paths allow 4096)"),
    ],
)
def test_external_locations_that_cannot_be_read_are_typed_errors(tmp_path, location, make, message):
    path = relocated_model(tmp_path, location, make)
    for lazy in (False, True) if "link" not in location else (False,):
        with pytest.raises(InvalidModelError, match=re.escape(message)):
            open_model(path, lazy=lazy)


# .npz files -----------------------------------------------------------------------------------


def npy_member(archive, name, dtype, shape, data=b""):
    """A .npy member whose header declares ``shape`` but which holds only ``data``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    archive.writestr(name, header.getvalue() + data)  # the header starts with the magic


def test_npz_declaring_terabytes_is_refused_with_its_size(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        npy_member(archive, "x.npy", np.float32, (10**12,), b"\0" * 64)
    assert path.stat().st_size < 1000
    with pytest.raises(CalibrationError, match=r"declares 3\.64 TiB of arrays \('x': float32"):
        load_npz(path)


def test_npz_keys_are_checked_before_the_data_is_read(tmp_path):
    """A small file whose member inflates to 256 MiB, under a name the model does not have: the
    name is refused from the header, before a byte of the data is inflated."""
    path = tmp_path / "inflating.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        npy_member(archive, "wrong.npy", np.float32, (2**26,), b"\0" * 2**28)
    assert path.stat().st_size < 2**20
    seen = {}

    def check(arrays):
        seen.update(arrays)
        raise CalibrationError("wrong key")

    with pytest.raises(CalibrationError, match="wrong key"):
        load_npz(path, check=check)
    assert seen["wrong"].shape == (2**26,) and seen["wrong"].nbytes == 2**28
    assert seen["wrong"].base is not None and seen["wrong"].strides == (0,)  # no memory
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [("x", [2**26])], [("y", None)], {}
    )
    config = CompressionConfig(params=0.5, inputs=str(path))
    with pytest.raises(CalibrationError, match="missing x; unknown wrong"):
        validation_inputs(model, config)
