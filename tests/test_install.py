"""The package as users install it: a wheel and an sdist built from this checkout install into
a fresh virtual environment and the installed ``onnx-lowrank`` runs.

Built once per session, without build isolation (setuptools and build come with the test
extra), and installed with ``--no-deps``: the new environment reads the runtime dependencies
(numpy, onnx, onnxruntime, ...) from this one through a ``.pth`` line, so nothing is downloaded.
Its own site-packages come first, so ``onnx_lowrank`` is the installed copy, not this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from builders import MNIST, REPO

pytest.importorskip("build")
pytestmark = pytest.mark.slow  # 12 s of CPU (CHANGELOG): one build, two installs, four CLI runs


@pytest.fixture(scope="session")
def dist(tmp_path_factory) -> Path:
    """``python -m build``: the sdist, then the wheel built from the sdist."""
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(  # what a clone has, plus files not yet committed
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in tracked.stdout.decode().split("\0"):  # a clean copy: no build/ or egg-info
        if name and (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return out


def _environment(folder: Path) -> Path:
    """A fresh venv that sees this environment's packages after its own; its python."""
    venv.create(folder, with_pip=False)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "outer_environment.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_built_package_installs_and_runs(dist, tmp_path, kind):
    (package,) = dist.glob(f"onnx_lowrank-*.{kind}")
    python = _environment(tmp_path / "env")
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--ignore-installed",  # a copy visible from here (an egg-info in the checkout on
            # PYTHONPATH, the outer environment's install) must not count as installed
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            str(package),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    script = tmp_path / "env" / "bin" / "onnx-lowrank"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )

    where = subprocess.run(
        [python, "-c", "import onnx_lowrank; print(onnx_lowrank.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.startswith(str(tmp_path / "env")), where.stderr[-2000:]
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("onnx-lowrank 0."), version
    listing = run("inspect", str(MNIST), "--json")
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout)["params"] == 421_642
    if kind == "whl":  # the sdist installs the same files (pip builds this wheel from it)
        out = tmp_path / "small.onnx"
        compressed = run("compress", str(MNIST), str(out), "--params", "0.5", "--latency-runs", "1")
        assert compressed.returncode == 0, compressed.stderr
        assert out.is_file()
