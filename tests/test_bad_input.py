"""Bad input on the command line: one line on stderr, the documented exit code, nothing written,
and the input's files unchanged (hashed before and after). test_cli.py covers the plain cases
(missing file, directory, empty, non-ONNX, truncated, budgets, --input-shape, output paths)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from builders import MNIST, make_model
from onnx import helper
from robust_helpers import file_hashes
from test_load import external_model, two_layer_model

from onnx_lowrank.cli import main
from onnx_lowrank.load import external_data_files


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "onnx_lowrank", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_one_line(result, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def broken_model(folder):
    """A model the ONNX checker rejects: a node reads a name that nothing produces."""
    model = two_layer_model()
    model.graph.node[1].input[0] = "nowhere"
    path = folder / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_missing_external_data_file(tmp_path):
    path = external_model(tmp_path / "in")
    (tmp_path / "in" / "model.onnx.data").unlink()
    before = file_hashes(tmp_path)
    result = run_cli("compress", path, "-o", tmp_path / "out.onnx", "--params", "0.5", cwd=tmp_path)
    assert_one_line(result, 2, "external data file 'model.onnx.data'")
    assert file_hashes(tmp_path) == before


def test_checker_failure_stops_unless_forced(tmp_path):
    path = broken_model(tmp_path)
    before = file_hashes(tmp_path)
    result = run_cli("compress", path, "-o", tmp_path / "out.onnx", "--params", "0.5", cwd=tmp_path)
    assert_one_line(result, 2, "fails the ONNX checker")
    assert "--force" in result.stderr
    assert file_hashes(tmp_path) == before
    forced = run_cli(
        "compress", path, "-o", tmp_path / "out.onnx", "--params", "0.5", "--force", cwd=tmp_path
    )
    # --force gets past the checker; ONNX Runtime then refuses the broken original
    assert forced.returncode == 2
    assert "going on because of --force" in forced.stderr
    assert "does not run in ONNX Runtime" in forced.stderr.splitlines()[-1]
    assert not (tmp_path / "out.onnx").exists()


def test_output_that_is_the_input_or_its_data_file(tmp_path):
    path = external_model(tmp_path)
    data = tmp_path / "model.onnx.data"
    before = file_hashes(tmp_path)
    same = run_cli("compress", path, "-o", path, "--params", "0.5", cwd=tmp_path)
    assert_one_line(same, 2, "is the input model; choose another path or pass --overwrite")
    onto_data = run_cli(
        "compress", path, "-o", data, "--params", "0.5", "--overwrite", cwd=tmp_path
    )
    assert_one_line(onto_data, 2, "is an external data file of the input model")
    assert file_hashes(tmp_path) == before


def test_overwrite_replaces_the_model_but_never_its_data_file(tmp_path):
    path = external_model(tmp_path)
    data_before = file_hashes(tmp_path / "model.onnx.data")
    result = run_cli(
        "compress",
        path,
        "-o",
        path,
        "--params",
        "0.5",
        "--overwrite",
        "--latency-runs",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "belongs to the input model" in result.stderr  # the new weights go elsewhere
    assert file_hashes(tmp_path / "model.onnx.data") == data_before
    assert external_data_files(path) == ((tmp_path / "model.onnx.1.data").resolve(),)
    onnx.checker.check_model(str(path), full_check=True)


def test_unwritable_output_paths(tmp_path):
    shutil.copy(MNIST, tmp_path / "mnist.onnx")
    (tmp_path / "a_file").write_text("x")
    result = run_cli(
        "compress", "mnist.onnx", "-o", "a_file/out.onnx", "--params", "0.5", cwd=tmp_path
    )
    assert_one_line(result, 2, "is a file, not a folder")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_cli(
        "compress", "mnist.onnx", "-o", locked / "out.onnx", "--params", "0.5", cwd=tmp_path
    )
    assert_one_line(result, 2, "is not writable")


def test_nothing_to_compress_writes_only_when_asked(tmp_path):
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="depthwise", group=4)
    model = make_model(
        [node], [("x", [1, 4, 8, 8])], [("y", None)], {"W": np.ones((4, 1, 3, 3), np.float32)}
    )
    path = tmp_path / "dw.onnx"
    onnx.save(model, path)
    quiet = run_cli("compress", path, "-o", tmp_path / "out.onnx", "--params", "0.5", cwd=tmp_path)
    assert_one_line(quiet, 0, "nothing to compress")
    assert "1 × grouped or depthwise convolution (group=4)" in quiet.stderr
    assert not (tmp_path / "out.onnx").exists()
    asked = run_cli(
        "compress",
        path,
        "-o",
        tmp_path / "out.onnx",
        "--params",
        "0.5",
        "--always-write",
        cwd=tmp_path,
    )
    assert asked.returncode == 0, asked.stderr
    assert (tmp_path / "out.onnx").read_bytes() == path.read_bytes()


def bad_npz_files(folder) -> dict[str, tuple[object, str]]:
    """Files that are not usable .npz archives, and the words their error must contain."""
    good = folder / "good.npz"
    np.savez(good, input=np.zeros((2, 1, 28, 28), np.float32))
    files = {
        "empty": (b"", "is not an .npz archive"),
        "text": (b"name,value\n1,2\n", "is not an .npz archive"),
        "truncated": (good.read_bytes()[:200], "is not an .npz archive"),
        "npy": (None, "is not an .npz archive"),
        "objects": (None, "Object arrays cannot be loaded"),
        "stray": (None, "'notes.txt', which is not a NumPy array"),
        "folder": (None, "is a directory"),
    }
    paths = {}
    for kind, (content, message) in files.items():
        path = folder / f"{kind}.npz"
        if content is not None:
            path.write_bytes(content)
        paths[kind] = (path, message)
    np.save(folder / "npy.npy", np.zeros(3))
    (folder / "npy.npy").rename(paths["npy"][0])
    np.savez(paths["objects"][0], input=np.array([object()], dtype=object))
    with zipfile.ZipFile(paths["stray"][0], "w") as archive:
        archive.writestr("notes.txt", "calibration images from the train split")
    paths["folder"][0].mkdir()
    return paths


@pytest.mark.parametrize("option", ["--inputs", "--calibration"])
@pytest.mark.parametrize(
    "kind", ["empty", "text", "truncated", "npy", "objects", "stray", "folder"]
)
def test_unreadable_npz_files_get_one_line(tmp_path, capsys, option, kind):
    path, message = bad_npz_files(tmp_path)[kind]
    out = tmp_path / "x.onnx"
    code = main(["compress", str(MNIST), "-o", str(out), "--params", "0.5", option, str(path)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"onnx-lowrank: error: {option} ")
    assert message in lines[0]
    assert not out.exists()
