"""ruff keeps the code base in one style; the suite fails when it finds something."""

import shutil
import subprocess

import pytest
from builders import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_check_passes():
    result = subprocess.run(
        ["ruff", "check", "onnx_lowrank", "tests", "samples", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_format_is_clean():
    result = subprocess.run(
        ["ruff", "format", "--check", "onnx_lowrank", "tests", "samples", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
