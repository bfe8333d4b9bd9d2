"""Compress a synthetic model larger than 2 GiB end to end, and measure peak memory.

The model is a chain of MatMul layers, ``(N, wide) @ (wide, narrow)`` then
``(N, narrow) @ (narrow, wide)`` with a Relu between, with random fp32 weights stored as external
data. It is written tensor by tensor, so building it needs one layer of memory. Then the CLI
compresses it in a child process (with validation in ONNX Runtime, as a user would run it), and
the child's peak resident set size (``ru_maxrss``) is compared with the model's size on disk.

    python benchmarks/large_model.py [--layers 36] [--wide 65536] [--narrow 256] [--params 0.5]
        [--workdir DIR] [--no-validate] [--keep]

The defaults give 36 × 256 × 65536 fp32 weights: 2.42 GB (2.25 GiB) in one data file. Results
are recorded in docs/robustness.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def build(folder: Path, layers: int, wide: int, narrow: int, seed: int = 0) -> Path:
    """Write the model to ``folder/large.onnx`` + ``large.onnx.data``, one layer at a time."""
    rng = np.random.default_rng(seed)
    data_name = "large.onnx.data"
    nodes, initializers = [], []
    current = "x"
    with open(folder / data_name, "wb") as data:
        for index in range(layers):
            rows, cols = (wide, narrow) if index % 2 == 0 else (narrow, wide)
            # a decaying spectrum, like trained weights, so a rank cut is meaningful
            weight = rng.standard_normal((rows, cols), dtype=np.float32)
            weight *= (1.0 / np.sqrt(1.0 + np.arange(cols, dtype=np.float32)))[None, :]
            name = f"W{index}"
            offset = data.tell()
            data.write(weight.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[rows, cols])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", offset),
                ("length", weight.nbytes),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            initializers.append(tensor)
            output = f"h{index}"
            nodes.append(helper.make_node("MatMul", [current, name], [output], name=f"mm{index}"))
            if index < layers - 1:
                nodes.append(helper.make_node("Relu", [output], [f"r{index}"], name=f"relu{index}"))
                current = f"r{index}"
            else:
                current = output
    out_width = narrow if layers % 2 else wide
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", wide])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", out_width])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "large.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path


def size_on_disk(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--wide", type=int, default=65536)
    parser.add_argument("--narrow", type=int, default=256)
    parser.add_argument("--params", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    args = parser.parse_args()

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="onnx-lowrank-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        path = build(folder, args.layers, args.wide, args.narrow)
        model_bytes = size_on_disk(folder, "large.onnx")
        elapsed = time.perf_counter() - started
        print(f"built {path.name}: {model_bytes / 1e9:.3f} GB in {elapsed:.0f} s")
        command = [
            sys.executable, "-m", "onnx_lowrank", "compress", str(path),
            "-o", str(folder / "small.onnx"), "--params", str(args.params),
            "--latency-runs", "2", "--timings", "--device", "cpu",
        ]  # fmt: skip
        if args.no_validate:
            command.append("--no-validate")
        started = time.perf_counter()
        # one BLAS thread: on a shared machine, spinning BLAS threads make SVDs many times slower
        env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **os.environ}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        print(result.stdout[-1500:])
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        output_bytes = size_on_disk(folder, "small.onnx")
        cpus = os.cpu_count()
        print(f"machine: {platform.machine()}, {cpus} CPUs, Python {platform.python_version()}")
        print(f"command: {' '.join(command[1:])}")
        print(f"model on disk:  {model_bytes / 1e9:.3f} GB")
        print(f"output on disk: {output_bytes / 1e9:.3f} GB")
        print(f"peak RSS:       {peak / 1e9:.3f} GB = {peak / model_bytes:.2f} x the model")
        print(f"wall time:      {wall:.0f} s")
        return 0 if peak < 2.5 * model_bytes else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
