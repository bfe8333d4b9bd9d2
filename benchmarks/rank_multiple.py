"""Which ranks run fast: the latency of factorized pairs against the rank, per layer shape.

    python benchmarks/rank_multiple.py [--models-dir DIR] [--ranks 8:49] [--json OUT.json]

For the Conv and Gemm/MatMul layers of the public models (MNIST CNN, CREPE tiny, MTCNN O-Net,
PP-OCR classifier, EfficientNet-Lite0 when present) it times the ``g = 1`` factorized pair at
every rank of ``--ranks`` (with latency.py's machinery: the rewrite's own pair, interleaved, on
the layer's real input shape, batch 1, the tool's session options), then reports, for each
multiple ``m`` in 1, 2, 4, 8, 16, how much slower a rank that is *not* a multiple of ``m`` runs
than the next multiple of ``m`` above it (the median over layers and ranks of
``T(r) / T(⌈r/m⌉·m)``): above 1 means rounding a rank *up* to the multiple costs no time. The
latency cache is a fresh temporary folder unless ``--cache`` names one. One intra-op thread
(the validation's default).
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

from compare_methods import default_models_dir, machine

from onnx_lowrank import CompressionConfig
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


def layer_times(path: Path, ranks: range, cache: LatencyCache) -> dict[str, dict[int, float]]:
    shapes = INPUT_SHAPES.get(path.stem, {})
    config = CompressionConfig(params=0.5, validate=False, input_shapes=shapes)
    analysis = analyze(path, config)
    book = LatencyBook(
        analysis.model, analysis.discovery, ["CPUExecutionProvider"], cache=cache, threads=1
    )
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
    info["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{len(times)} layers; {info}")
    if args.json:
        data = {"machine": info, "slowdowns": result, "times": times}
        args.json.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
