"""Cost of building the calibration probe graph through onnx-graphsurgeon. Run by hand:

    PYTHONPATH=. python benchmarks/probe_graphs.py [--repeat 5]

On the ResNet-50-shaped (``resnet_model.py``) and BERT-shaped (``transformer.py``) models it
exposes the input of every Conv/Gemm/MatMul as a graph output, as calibration does, twice:
through ``sessions.exposed`` (``surgery.Surgery``: graphsurgeon import, edit, export with what
a round trip drops restored) and by appending outputs to a protobuf copy of the model (the
direct edit it replaced). It checks that both give the same outputs and prints the median time
of each, alternated, with the range (docs/design.md, "Graph surgery").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet_model import build_resnet50
from transformer import build_transformer

from onnx_lowrank.sessions import exposed


def direct(model: onnx.ModelProto, wanted: dict[str, int]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {info.name for info in (*copy.graph.input, *copy.graph.output)}
    for name, elem_type in wanted.items():
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    models = {"ResNet-50-shaped": build_resnet50(), "BERT-shaped": build_transformer(12)}
    print("| model | outputs | graphsurgeon s | protobuf copy s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for label, model in models.items():
        layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        wanted = {node.input[0]: onnx.TensorProto.FLOAT for node in layers}
        names = {info.name for info in exposed(model, wanted).graph.output}
        assert names == {info.name for info in direct(model, wanted).graph.output}
        times: dict[str, list[float]] = {"gs": [], "direct": []}
        for _ in range(args.repeat):
            for key, build in (("gs", exposed), ("direct", direct)):
                started = time.perf_counter()
                build(model, wanted)
                times[key].append(time.perf_counter() - started)
        gs_s, direct_s = (statistics.median(times[key]) for key in ("gs", "direct"))
        spread = {key: f"{min(v):.3f}–{max(v):.3f}" for key, v in times.items()}
        print(
            f"| {label} | {len(wanted)} | {gs_s:.3f} ({spread['gs']}) | "
            f"{direct_s:.3f} ({spread['direct']}) | {gs_s / direct_s:.1f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
