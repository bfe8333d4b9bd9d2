"""Speed and memory on a BERT-base-shaped model (MatMul layers on 3-D inputs). Run by hand:

    python benchmarks/transformer.py [--layers 12] [--repeat 3] [--json results.json]

The model is built with onnx.helper: ``--layers`` encoder blocks of BERT-base's linear layers
(hidden 768, FFN 3072), each a MatMul on a ``(batch, 128, 768)`` input plus a bias ``Add``: the
query, key, value and output projections and the two FFN layers, 72 MatMul and 85 M weights
for 12 blocks (340 MB). Attention itself is replaced by a ``Sum`` of the three projections (it
has no weights, so it changes nothing the tool does), GELU by ``Relu``. Weights are random,
scaled by ``1/sqrt(fan_in)``.

It runs ``onnx-lowrank compress MODEL -o OUT --params 0.5`` as a subprocess, with the default
``--max-groups all``, with ``--max-groups 8`` and with ``--no-validate``, ``--repeat`` times
each, and prints the wall time, peak resident memory and the stage split of the median run
(``resnet50.run_compress``). It also measures what one ONNX Runtime CPU session of the original
model adds to a process's peak memory. Results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet50 import STAGES, bench_compress, machine

HIDDEN, FFN, SEQUENCE = 768, 3072, 128


def build_transformer(layers: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []

    def linear(data: str, name: str, fan_in: int, fan_out: int) -> str:
        weight = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"{name}.weight"))
        weights.append(numpy_helper.from_array(np.zeros(fan_out, np.float32), f"{name}.bias"))
        nodes.append(
            helper.make_node("MatMul", [data, f"{name}.weight"], [f"{name}.mm"], name=name)
        )
        nodes.append(
            helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [name], name=f"{name}/bias")
        )
        return name

    x = "x"
    for block in range(layers):
        prefix = f"layer{block}"
        projections = [
            linear(x, f"{prefix}.{p}", HIDDEN, HIDDEN) for p in ("query", "key", "value")
        ]
        nodes.append(helper.make_node("Sum", projections, [f"{prefix}.mix"], name=f"{prefix}.mix"))
        attention = linear(f"{prefix}.mix", f"{prefix}.output", HIDDEN, HIDDEN)
        nodes.append(
            helper.make_node("Add", [x, attention], [f"{prefix}.res"], name=f"{prefix}.res")
        )
        up = linear(f"{prefix}.res", f"{prefix}.ffn1", HIDDEN, FFN)
        nodes.append(helper.make_node("Relu", [up], [f"{prefix}.act"], name=f"{prefix}.act"))
        down = linear(f"{prefix}.act", f"{prefix}.ffn2", FFN, HIDDEN)
        nodes.append(
            helper.make_node(
                "Add", [f"{prefix}.res", down], [f"{prefix}.out"], name=f"{prefix}.out"
            )
        )
        x = f"{prefix}.out"
    shape = ["batch", SEQUENCE, HIDDEN]
    graph = helper.make_graph(
        nodes,
        "transformer_shaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# VmHWM, the peak RSS of this process's own memory (ru_maxrss would carry over the parent's peak
# through fork and exec, and the parent has just built the model).
_SESSION_PROBE = """
import sys
import onnxruntime

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

before = peak_kib()
onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(peak_kib() - before)
"""


def session_memory_mb(path: Path, repeat: int = 5) -> list[float]:
    """Peak memory one ONNX Runtime CPU session of ``path`` adds to a fresh process, in MiB,
    for ``repeat`` fresh processes (it varies from run to run)."""
    probe = [sys.executable, "-c", _SESSION_PROBE, str(path)]
    runs = [
        subprocess.run(probe, capture_output=True, text=True, check=True) for _ in range(repeat)
    ]
    return [int(run.stdout.strip()) / 1024 for run in runs]  # KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results = {"machine": machine(), "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "transformer.onnx"
        model = build_transformer(args.layers)
        onnx.save(model, str(path))
        size = path.stat().st_size
        print(f"{args.layers} blocks, {size / 1e6:.0f} MB", file=sys.stderr)
        for label, extra in (
            ("--max-groups all (default)", ["--max-groups", "all"]),
            ("--max-groups 8", []),
            ("--max-groups all --no-validate", ["--max-groups", "all", "--no-validate"]),
        ):
            results["runs"][label] = bench_compress(path, Path(folder), args.repeat, extra)
        results["session_mb"] = session_memory_mb(path)
    results["model_mb"] = size / 1e6
    print(f"| settings | wall s | peak RSS MB (× model) | {' | '.join(STAGES)} |")
    print("|---|---:|---:|" + "---:|" * len(STAGES))
    for label, run in results["runs"].items():
        stages = " | ".join(f"{run['timings'][stage]:.2f}" for stage in STAGES)
        peak = run["max_peak_rss_mb"]
        ratio = peak / (size / 2**20)
        print(f"| {label} | {run['wall_s']:.1f} | {peak:.0f} ({ratio:.1f}×) | {stages} |")
    low, high = min(results["session_mb"]), max(results["session_mb"])
    print(f"\none ONNX Runtime session of the original adds {low:.0f}–{high:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
