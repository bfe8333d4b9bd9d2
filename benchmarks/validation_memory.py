"""Peak memory of validation for a small Conv model with a large output.

The model (built with onnx.helper, dynamic batch): input (N, 3, 16, 16), Conv 3→512 3×3, Relu,
Conv 512→896 3×3 (4.1 M weights, 15.8 MiB in all), then a nearest Resize ×4 to 64×64, so each
sample's output is 896×64×64 float32 = 14 MiB and the 8 random validation samples give
112 MiB per model. It is compressed once (``--params 0.5``, no validation); then a fresh
Python process runs ``validate(original, compressed)`` with the default options and reports
its peak resident memory (``VmHWM`` from /proc/self/status, the child's own peak), together
with the baseline: the same process after loading both models and creating nothing else.

    python benchmarks/validation_memory.py [--code DIR] [--resize 4] [--json out.json]

The child imports onnx_lowrank from this checkout, or with ``--code DIR`` from another one (an
older commit, to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import onnx

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

import onnx_lowrank
from onnx_lowrank import CompressionConfig
from onnx_lowrank.validate import validate
original, compressed = onnx.load(sys.argv[1]), onnx.load(sys.argv[2])
loaded = peak()
started = time.perf_counter()
report = validate(original, compressed, CompressionConfig(latency_runs=3))
seconds = time.perf_counter() - started
(output,) = report.outputs
print(json.dumps({
    "code": onnx_lowrank.__file__,
    "peak_bytes": peak(),
    "after_load_bytes": loaded,
    "validate_s": seconds,
    "output_shape": list(output.shape),
    "rel_l2_error": output.rel_l2_error,
    "rows_per_run": getattr(report, "rows_per_run", None),
}))
"""


def build(resize: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {
        "W1": (rng.standard_normal((512, 3, 3, 3)) / 5).astype(np.float32),
        "W2": (rng.standard_normal((896, 512, 3, 3)) / 68).astype(np.float32),
        "scales": np.array([1, 1, resize, resize], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["b", "", "scales"], ["y"], name="up", mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 896, None, None])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, help="import onnx_lowrank from this checkout")
    parser.add_argument("--resize", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from onnx_lowrank import CompressionConfig, compress

    with tempfile.TemporaryDirectory() as folder:
        original = Path(folder) / "wide.onnx"
        onnx.save(build(args.resize), original)
        compressed = Path(folder) / "wide.half.onnx"
        compress(original, CompressionConfig(params=0.5, validate=False)).save(compressed)
        env = dict(os.environ)
        env["PYTHONPATH"] = str((args.code or REPO).resolve())
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(original), str(compressed)],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder,
            check=True,
        )
        result = json.loads(child.stdout)
        result["model_bytes"] = original.stat().st_size
    mib = 2**20
    print(
        f"{result['code']}: model {result['model_bytes'] / mib:.1f} MiB, output "
        f"{tuple(result['output_shape'])}; peak {result['peak_bytes'] / mib:.0f} MiB "
        f"(after loading the models {result['after_load_bytes'] / mib:.0f} MiB), validate "
        f"{result['validate_s']:.1f} s, rows per run {result['rows_per_run']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
