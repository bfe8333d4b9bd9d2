"""Which ranks run fast: the latency of factorized pairs against the rank, per layer shape.

    python benchmarks/rank_multiple.py [--models-dir DIR] [--ranks 8:49] [--json OUT.json]
                                       [--widths 4,8,16,32]

For the Conv and Gemm/MatMul layers of the public models (MNIST CNN, CREPE tiny, MTCNN O-Net,
PP-OCR classifier, EfficientNet-Lite0 when present) it times the ``g = 1`` factorized pair at
every rank of ``--ranks`` (with latency.py's machinery: the rewrite's own pair, interleaved, on
the layer's real input shape, batch 1, the tool's session options), then reports, for each
multiple ``m`` in 1, 2, 4, 8, 16, how much slower a rank that is *not* a multiple of ``m`` runs
than the next multiple of ``m`` above it (the median over layers and ranks of
``T(r) / T(⌈r/m⌉·m)``): above 1 means rounding a rank *up* to the multiple costs no time. The
latency cache is a fresh temporary folder unless ``--cache`` names one. One intra-op thread
(the validation's default).

Then the grouped pairs: for every Conv layer whose input channels ``c`` are a multiple of every
width in ``--widths`` (at most 512), the pair whose groups are ``w`` channels wide in and out
(``g = c/w`` groups of rank ``r = w``: the same total rank ``c`` at every width, the first conv's
MACs proportional to ``w``), and the median over layers of ``T(w) / T(block)``, where ``block``
is ONNX Runtime's NCHWc block as ``nchwc_block`` reads it from the runtime's optimizer (printed
with ``device.preferred_multiple``'s block, from the CPU's flags). Below the block the MACs
halve with each halving of ``w``; a ratio above 1 there is the cost of leaving the NCHWc layout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import onnx
import onnxruntime as ort
from compare_methods import default_models_dir, machine
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import CompressionConfig, device
from onnx_lowrank.latency import LatencyBook, LatencyCache
from onnx_lowrank.pipeline import analyze

REPO = Path(__file__).resolve().parent.parent
MULTIPLES = (1, 2, 4, 8, 16)


def models(models_dir: Path) -> list[Path]:
    paths = [
        REPO / "samples" / "mnist_cnn.onnx",
        REPO / "tests" / "models" / "crepe_tiny.onnx",
        REPO / "tests" / "models" / "mtcnn_onet.onnx",
        REPO / "tests" / "models" / "ppocr_mobile_v2.0_cls.onnx",
        models_dir / "efficientnet_lite0.onnx",
    ]
    return [path for path in paths if path.exists()]


#: Concrete input shapes of models with dynamic spatial dimensions.
INPUT_SHAPES = {"ppocr_mobile_v2.0_cls": {"x": (1, 3, 48, 192)}}


def analysis_and_book(path: Path, cache: LatencyCache):
    """The model's analysis and a one-thread CPU latency book on its real input shapes."""
    shapes = INPUT_SHAPES.get(path.stem, {})
    analysis = analyze(path, CompressionConfig(params=0.5, validate=False, input_shapes=shapes))
    book = LatencyBook(
        analysis.model, analysis.discovery, ["CPUExecutionProvider"], cache=cache, threads=1
    )
    return analysis, book


def layer_times(path: Path, ranks: range, cache: LatencyCache) -> dict[str, dict[int, float]]:
    analysis, book = analysis_and_book(path, cache)
    wanted = {}
    for layer in analysis.discovery.layers:
        if layer.name in book.unknown:
            continue
        full = min(layer.out_channels, layer.cols)
        usable = [r for r in ranks if r < full]
        if layer.op_type in ("Conv", "Gemm", "MatMul") and len(usable) > 16:
            wanted[layer.name] = [(1, r) for r in usable]
    book.items(wanted)
    return {
        f"{path.stem}:{name}": {r: book.timed[name][(1, r)] for _, r in items}
        for name, items in wanted.items()
    }


#: Channels-per-group widths ``nchwc_block`` tries, smallest first (1 is depthwise, which NCHWc
#: takes at any block).
PROBE_WIDTHS = (2, 4, 8, 16, 32, 64)


def nchwc_block() -> int:
    """The smallest channels-per-group width at which ONNX Runtime's CPU EP runs a grouped Conv
    in its blocked NCHWc layout, read from the graph its optimizer writes (full optimization, as
    the tool's sessions): its NCHWc block; 1 when no width does.

    For each width ``w`` of ``PROBE_WIDTHS`` a 3x3 Conv of 64 channels in ``64/w`` groups is
    optimized, and the optimized graph says whether the Conv moved to ``com.microsoft.nchwc``.
    A deterministic reading of what the runtime does, unlike a timing.
    """
    channels = max(PROBE_WIDTHS)
    with tempfile.TemporaryDirectory(prefix="nchwc-probe-") as folder:
        for width in PROBE_WIDTHS:
            weight = np.ones((channels, width, 3, 3), np.float32)
            conv = helper.make_node(
                "Conv", ["x", "w"], ["y"], group=channels // width, pads=[1] * 4
            )
            graph = helper.make_graph(
                [conv],
                "nchwc_probe",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                [numpy_helper.from_array(weight, "w")],
            )
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
            model.ir_version = 8
            options = ort.SessionOptions()
            options.log_severity_level = 4
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = os.path.join(folder, f"{width}.onnx")
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            optimized = onnx.load(options.optimized_model_filepath)
            if any(
                node.op_type == "Conv" and node.domain == "com.microsoft.nchwc"
                for node in optimized.graph.node
            ):
                return width
    return 1


def grouped_times(
    path: Path, widths: list[int], cache: LatencyCache
) -> dict[str, dict[int, float]]:
    """Per Conv layer, the time of the pair with groups ``w`` channels wide in and out."""
    analysis, book = analysis_and_book(path, cache)
    wanted = {}
    for layer in analysis.discovery.layers:
        c = layer.in_channels
        if layer.op_type != "Conv" or layer.name in book.unknown or c > 512:
            continue
        if all(c % w == 0 and c // w > 1 for w in widths):
            wanted[layer.name] = [(c // w, w) for w in widths]
    book.items(wanted)
    return {
        f"{path.stem}:{name}": {r: book.timed[name][(g, r)] for g, r in items}
        for name, items in wanted.items()
        if all((g, r) in book.timed.get(name, {}) for g, r in items)
    }


def slowdowns(times: dict[str, dict[int, float]]) -> dict[int, float]:
    result = {}
    for multiple in MULTIPLES:
        ratios = []
        for per_rank in times.values():
            for rank, ms in per_rank.items():
                up = math.ceil(rank / multiple) * multiple
                if up != rank and up in per_rank:
                    ratios.append(ms / per_rank[up])
        result[multiple] = statistics.median(ratios) if ratios else 1.0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--ranks", default="8:49")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache", type=Path, help="latency cache folder (default: a new one)")
    parser.add_argument("--widths", default="4,8,16,32", help="channels per group of the pairs")
    args = parser.parse_args()
    start, stop = (int(part) for part in args.ranks.split(":"))
    info = machine()
    cache = LatencyCache(args.cache or Path(tempfile.mkdtemp(prefix="rank-multiple-")))
    times: dict[str, dict[int, float]] = {}
    for path in models(args.models_dir):
        times.update(layer_times(path, range(start, stop), cache))
        print(f"{path.name}: {len(times)} layers so far", file=sys.stderr)
    result = slowdowns(times)
    print("| multiple m | median T(r) / T(next multiple of m) over ranks not a multiple |")
    print("|---|---|")
    for multiple, ratio in result.items():
        print(f"| {multiple} | {ratio:.3f} |")
    widths = [int(w) for w in args.widths.split(",")]
    grouped: dict[str, dict[int, float]] = {}
    for path in models(args.models_dir):
        grouped.update(grouped_times(path, widths, cache))
    block, flags = nchwc_block(), device.preferred_multiple("CPUExecutionProvider")
    reference = block if block in widths else max(widths)
    print(f"\nNCHWc block read from ONNX Runtime: {block}; from the CPU flags: {flags}")
    print(f"\n| channels per group w | median T(w) / T({reference}), {len(grouped)} Conv layers |")
    print("|---|---|")
    for w in widths:
        ratio = statistics.median(t[w] / t[reference] for t in grouped.values())
        print(f"| {w} | {ratio:.3f} |")
    info["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{len(times)} layers; {info}")
    if args.json:
        data = {"machine": info, "slowdowns": result, "times": times, "grouped": grouped}
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
