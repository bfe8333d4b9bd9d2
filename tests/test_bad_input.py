"""Bad input on the command line: one line on stderr, the documented exit code, nothing written,
and the input's files unchanged (hashed before and after). test_cli.py covers the plain cases
(missing file, directory, empty, non-ONNX, truncated, budgets, --input-shape, output paths)."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
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


# files that must never be replaced (issue 10, items 8 and 9) -------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--report", "out.onnx"], "--report out.onnx is the output model (-o)"),
        (["--plot", "out.onnx"], "--plot out.onnx is the output model (-o)"),
        (["--report", "out.onnx.data"], "is the output model's external data file"),
        (["--report", "out.onnx.1.data"], "is the output model's external data file"),
        (["--report", "model.onnx"], "--report model.onnx is the input model"),
        (["--report", "model.onnx.data"], "is an external data file of the input model"),
        (["--report", "hardlink.json"], "is the input model"),
        (["--report", "r.json", "--plot", "./r.json"], "--plot r.json is the file of --report"),
        (["--inputs", "x.npz", "--report", "x.npz"], "--report x.npz is the --inputs file"),
        (["--calibration", "out.onnx"], "-o out.onnx is the --calibration file"),
    ],
)
def test_report_and_plot_never_name_the_model_files(tmp_path, options, message):
    path = external_model(tmp_path)
    np.savez(tmp_path / "x.npz", x=np.zeros((1, 8, 4, 4), np.float32))
    os.link(path, tmp_path / "hardlink.json")
    (tmp_path / "out.onnx").write_bytes(b"previous output")
    before = file_hashes(tmp_path)
    result = run_cli(
        "compress", "model.onnx", "-o", "out.onnx", "--params", "0.5", *options, cwd=tmp_path
    )
    assert_one_line(result, 2, message)
    assert file_hashes(tmp_path) == before


@pytest.mark.parametrize("option", ["-o", "--report", "--plot"])
@pytest.mark.parametrize("kind", ["fifo", "link to fifo", "directory"])
def test_outputs_that_are_not_regular_files_are_refused(tmp_path, option, kind):
    shutil.copy(MNIST, tmp_path / "mnist.onnx")
    special = tmp_path / "special"
    os.mkfifo(special) if "fifo" in kind else special.mkdir()
    named = special
    if kind.startswith("link"):
        named = tmp_path / "link"
        named.symlink_to(special)
    args = ["-o", "out.onnx", option, named] if option != "-o" else ["-o", named]
    result = run_cli("compress", "mnist.onnx", *args, "--params", "0.5", cwd=tmp_path)
    what = "a named pipe (FIFO)" if "fifo" in kind else "a directory"
    assert_one_line(result, 2, f"{named} is {what}, not a regular file")
    assert special.is_fifo() if "fifo" in kind else special.is_dir()
    assert named.is_symlink() == kind.startswith("link")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_dev_null_is_refused_and_stays_a_device(tmp_path, option):
    """As root (this test suite often runs as root), renaming onto /dev/null would replace it."""
    before = os.stat("/dev/null")
    args = ["-o", "/dev/null"] if option == "-o" else ["-o", "out.onnx", option, "/dev/null"]
    result = run_cli("compress", MNIST, *args, "--params", "0.5", cwd=tmp_path)
    assert_one_line(result, 2, "/dev/null is a character device, not a regular file")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


def test_sweep_never_writes_onto_a_fifo(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    os.mkfifo(out / "sweep.json")
    result = run_cli("sweep", MNIST, "--out", out, "--params", "0.5", "--no-validate", cwd=tmp_path)
    assert_one_line(result, 2, "sweep.json is a named pipe (FIFO), not a regular file")
    assert (out / "sweep.json").is_fifo()
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


# options and files that ended in "internal error" --------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--latency-r", "3"], "unrecognized arguments: --latency-r 3"),
        (["--par", "0.5"], "unrecognized arguments: --par"),
        (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    ],
)
def test_abbreviated_options_and_negative_seeds_are_refused(tmp_path, capsys, options, message):
    args = ["compress", str(MNIST), "-o", str(tmp_path / "out.onnx"), *options]
    if "--par" not in options:
        args += ["--params", "0.5"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out.onnx").exists()


def test_every_parser_refuses_abbreviations():
    from onnx_lowrank.cli_options import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert not parser.allow_abbrev
    assert all(not sub.allow_abbrev for sub in commands.choices.values())


def test_external_data_links_and_folders_get_one_line(tmp_path):
    from test_load import link_data, relocated_model

    for location, make, message in [
        ("link.data", link_data, "is a symbolic link"),
        ("model.onnx.data/", None, "ends in a path separator"),
        ("model\0.data", None, "holds a NUL byte"),
    ]:
        folder = tmp_path / str(len(location))
        path = relocated_model(folder, location, make)
        before = file_hashes(folder)
        out = tmp_path / "out.onnx"
        result = run_cli("compress", path, "-o", out, "--params", "0.5", cwd=tmp_path)
        assert_one_line(result, 2, message)
        assert file_hashes(folder) == before and not out.exists()


def with_metadata(folder, text):
    model = two_layer_model()
    onnx.helper.set_model_props(model, {"onnx_lowrank.factorized": text})
    path = folder / "recorded.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "maximum recursion depth"),
        ('[{"name": "conv", "second": "conv", "params_dense": 1e400, "params": 10}]', "inf"),
        (
            '[{"name": "conv", "second": "conv", "params_dense": 1000000000000000000000000000000,'
            ' "params": 10}]',
            "1000000000000000000000000000000 is not an integer in [0, 2**40]",
        ),
        (
            '[{"name": "conv", "second": "conv", "params_dense": 1000000, "params": 10}]',
            "exceeds what its factors allow",
        ),
        ('{"name": 1}', "unreadable"),
    ],
)
def test_malformed_factorization_metadata_is_a_typed_error(tmp_path, capsys, text, message):
    path = with_metadata(tmp_path, text)
    for command in (["inspect", str(path)], ["compress", str(path), "-o", "x", "--params", "1"]):
        assert main(command) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert "onnx_lowrank.factorized metadata is unreadable" in lines[0]
        assert message in lines[0]


def test_out_of_memory_is_one_line_that_names_the_size(tmp_path, capsys, monkeypatch):
    """Fault injection: a stage asks NumPy for 8 PiB; the real MemoryError becomes one line."""
    from onnx_lowrank import pipeline

    def greedy(*args, **kwargs):
        return np.empty(2**50, np.float64)

    monkeypatch.setattr(pipeline, "compute_spectra", greedy)
    out = tmp_path / "out.onnx"
    assert main(["compress", str(MNIST), "-o", str(out), "--params", "0.5", "-q"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    size = MNIST.stat().st_size / 2**20
    assert lines[0].startswith(
        f"onnx-lowrank: error: out of memory while compressing {MNIST} (a {size:.1f} MiB model"
    )
    assert "Unable to allocate 8.00 PiB" in lines[0]
    assert not out.exists()


def test_no_validate_still_runs_the_checker_on_the_written_model(tmp_path, capsys, monkeypatch):
    """Fault injection: a rewrite that breaks the graph is caught before anything is written,
    even with --no-validate."""
    from onnx_lowrank import pipeline

    real_rewrite = pipeline.rewrite

    def broken_rewrite(*args, **kwargs):
        model = real_rewrite(*args, **kwargs)
        model.graph.node[-1].input[0] = "nowhere"
        return model

    monkeypatch.setattr(pipeline, "rewrite", broken_rewrite)
    out = tmp_path / "out.onnx"
    code = main(["compress", str(MNIST), "-o", str(out), "--params", "0.5", "--no-validate"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fails the ONNX checker" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("report", ["model.onnx", "model.onnx.data", "fifo"])
def test_inspect_report_never_replaces_the_model_or_a_special_file(tmp_path, report):
    external_model(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    before = file_hashes(tmp_path / "model.onnx", tmp_path / "model.onnx.data")
    result = run_cli("inspect", "model.onnx", "--report", report, cwd=tmp_path)
    message = "is a named pipe (FIFO)" if report == "fifo" else "is a file of the input model"
    assert_one_line(result, 2, message)
    assert file_hashes(tmp_path / "model.onnx", tmp_path / "model.onnx.data") == before
    assert (tmp_path / "fifo").is_fifo()
