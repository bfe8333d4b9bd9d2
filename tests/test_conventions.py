"""Command-line conventions shared with other ONNX tools (issue 15): positional output, shape
syntax, --version/--quiet, exit codes in --help, progress bars only on a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import onnx
import pytest
from builders import MNIST, MODELS, REPO, check_model

from onnx_lowrank.cli import main, parse_args
from onnx_lowrank.config import parse_input_shape, parse_input_shapes
from onnx_lowrank.errors import ConfigError

FAST = ["--params", "0.5", "--latency-runs", "1", "-q"]


def test_positional_output_and_dash_o_give_the_same_model(tmp_path, capsys):
    positional, option, late = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    assert main(["compress", str(MNIST), str(positional), *FAST]) == 0
    assert main(["compress", str(MNIST), "-o", str(option), *FAST]) == 0
    assert main(["compress", str(MNIST), *FAST, str(late)]) == 0  # after the options
    check_model(onnx.load(positional))
    assert positional.read_bytes() == option.read_bytes() == late.read_bytes()
    assert capsys.readouterr().out == ""  # -q: nothing but errors


def test_output_after_input_shapes():
    args = parse_args(
        ["compress", "in.onnx", "--input-shapes", "x:1,3", "out.onnx", "--params", "1"]
    )
    assert args.output == "out.onnx" and args.input_shapes == ["x:1,3"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{out}", "-o", "{out}2"], "the output is given twice"),
        ([], "no output given"),
        (["{out}", "{out}2"], "unrecognized arguments"),
    ],
)
def test_output_given_twice_or_not_at_all_is_an_error(tmp_path, capsys, args, message):
    out = str(tmp_path / "x.onnx")
    argv = ["compress", str(MNIST), *[a.format(out=out) for a in args], *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnx-lowrank: error:") and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_sweep_takes_dash_o(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", str(MNIST), "-o", str(out), "--params", "0.5", "--latency-runs", "1", "-q"]
    assert main(argv) == 0
    assert (out / "sweep.json").is_file()
    assert (out / "mnist_cnn.alds.p0.5.onnx").is_file()


def test_shape_syntaxes():
    assert parse_input_shape("x:1,3,224,224") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("x:1x3x224x224") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("x:[1,3,224,224]") == ("x", (1, 3, 224, 224))
    assert parse_input_shape("input_1:0:1x10") == ("input_1:0", (1, 10))
    assert parse_input_shapes(["x:1,3,8,8 y:1,10", "z:2x2"]) == {
        "x": (1, 3, 8, 8),
        "y": (1, 10),
        "z": (2, 2),
    }
    with pytest.raises(ConfigError, match="given twice"):
        parse_input_shapes(["x:1,3", "x:1,4"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_input_shapes(["x:1,3 x:1,3"])
    with pytest.raises(ConfigError, match="NAME:D1,D2"):
        parse_input_shapes(["x:1xa"])


def test_input_shapes_on_a_real_model(capsys):
    """Silero VAD's inputs are dynamic; every spelling of the same shapes gives the same MACs."""
    model = str(MODELS / "silero_vad.onnx")
    spellings = [
        ["--input-shapes", "input:1,576", "state:2,1,128"],
        ["--input-shape", "input:1x576", "--input-shape", "state:[2,1,128]"],
    ]
    outputs = []
    for spelling in spellings:
        assert main(["inspect", model, *spelling]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert main(["inspect", model, "--input-shapes", "input:1,576", "input:2,576"]) == 2
    assert "'input' is given twice" in capsys.readouterr().err


def test_help_lists_exit_codes_and_version(capsys):
    for argv in (["--help"], ["compress", "--help"], ["sweep", "--help"], ["inspect", "--help"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 0
        out = capsys.readouterr().out
        for code in ("0 ", "1 ", "2 ", "3 ", "130"):
            assert f"\n  {code}" in out, (argv, code)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("onnx-lowrank 0.")


def _compress_with_stderr(tmp_path, terminal: bool, *extra: str) -> str:
    """Run the CLI with stderr on a pseudo-terminal or a pipe; return what stderr got."""
    argv = [sys.executable, "-m", "onnx_lowrank", "compress", str(MNIST), str(tmp_path / "o.onnx")]
    argv += ["--params", "0.5", "--latency-runs", "1", *extra]
    if not terminal:
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr
    leader, follower = pty.openpty()
    # a terminal of 0 columns (a bare pty) gets empty bars
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=follower, cwd=REPO, env=os.environ.copy()
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal(tmp_path):
    on_terminal = _compress_with_stderr(tmp_path, True)
    assert "spectra" in on_terminal and "layer" in on_terminal and "\r" in on_terminal
    assert _compress_with_stderr(tmp_path, False) == ""
    assert _compress_with_stderr(tmp_path, True, "-q") == ""
