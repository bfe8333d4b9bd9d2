"""The README's examples run as written (the onnx-graphsurgeon habit: documentation that is
executed). A fenced block after ``<!-- README test: ... -->`` is:

* ``run``: every command line is run, in order, by bash in one scratch folder where ``samples``
  is this checkout's, ``onnx-lowrank`` is this checkout's CLI and ``python`` this interpreter;
  ``run from "WORD" on`` skips the lines before the first that starts with WORD (installs);
* ``write PATH``: the block is written to PATH (a config file the next commands read);
* ``output``: the block is ``$ COMMAND`` and what it prints, compared line by line.
"""

from __future__ import annotations

import re
import subprocess
import sys

from builders import REPO

MARKER = re.compile(r"<!-- README test: (.*?) -->\n```[a-z]*\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str]]:
    return MARKER.findall((REPO / "README.md").read_text(encoding="utf-8"))


def _script(blocks: list[tuple[str, str]]) -> str:
    lines = [
        "set -euo pipefail",
        f'onnx-lowrank() {{ PYTHONPATH="{REPO}" "{sys.executable}" -m onnx_lowrank "$@"; }}',
        f'python() {{ PYTHONPATH="{REPO}" "{sys.executable}" "$@"; }}',
    ]
    for kind, body in blocks:
        if kind.startswith("write "):
            path = kind.split()[1]
            lines.append(f"cat > {path} <<'README_EOF'\n{body}README_EOF")
        elif kind.startswith("run"):
            commands = [line for line in body.splitlines() if line and not line.startswith("#")]
            start = re.match(r'run from "(\w+)" on', kind)
            if start:
                first = next(i for i, c in enumerate(commands) if c.startswith(start.group(1)))
                commands = commands[first:]
            lines += [f"echo '+ {c}' >&2\n{c}" for c in commands]
    return "\n".join(lines) + "\n"


def test_readme_examples_run(tmp_path):
    blocks = readme_blocks()
    kinds = [kind.split()[0] for kind, _ in blocks]
    assert kinds.count("run") >= 4 and "write" in kinds and "output" in kinds
    (tmp_path / "samples").symlink_to(REPO / "samples")
    done = subprocess.run(
        ["bash", "-c", _script([b for b in blocks if not b[0].startswith("output")])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # what the README says the commands do
    assert (tmp_path / "out" / "mnist_half.onnx").is_file()
    assert "pinned by the user" in done.stdout and "excluded by the user" in done.stdout
    assert (tmp_path / "out" / "mnist_ci.onnx").is_file()  # and cmp found it identical
    assert (tmp_path / "out" / "mnist_config.onnx").is_file()


def test_readme_shows_real_output(tmp_path):
    (tmp_path / "samples").symlink_to(REPO / "samples")
    shown = [body for kind, body in readme_blocks() if kind.startswith("output")]
    assert shown
    for body in shown:
        command, *expected = body.rstrip("\n").splitlines()
        assert command.startswith("$ onnx-lowrank ")
        args = command.removeprefix("$ onnx-lowrank ").split()
        done = subprocess.run(
            [sys.executable, "-m", "onnx_lowrank", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.rstrip("\n").splitlines() == expected
