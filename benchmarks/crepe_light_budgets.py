"""Why data-free compression of CREPE tiny looks slightly *better* than the original at light
budgets (docs/calibration.md, "Where calibration is not ahead"). Run by hand:

    python benchmarks/crepe_light_budgets.py [--eval-tones 8192] [--tones 256]

Same data as benchmarks/calibration.py (calibration tones seed 1, evaluation tones seed 2) and
the default method ``alds``. It prints:

1. for 95/90/80 % of the parameters, which layers each mode factorizes (``g``, ``r``) and the
   raw pitch accuracy (RPA, within 50 cents) and mean error in cents;
2. for the classifier Gemm alone truncated to rank ``r`` (plain SVD, everything else
   original): RPA, mean cents, the frames it turns wrong → right and right → wrong against the
   original with the exact two-sided McNemar p-value, the change of the median frame's error
   and the share of frames whose error drops.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration as bench

from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize

CLASSIFIER = "classifier.weight"


def mcnemar(better: int, worse: int) -> float:
    """Exact two-sided McNemar p-value of ``better`` against ``worse`` discordant frames."""
    n = better + worse
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(better, worse) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tones", type=int, default=256, help="calibration frames")
    parser.add_argument("--eval-tones", type=int, default=8192, help="evaluation frames")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.95, 0.9, 0.8])
    parser.add_argument("--ranks", type=int, nargs="+", default=[200, 150, 110, 78, 64, 48, 32])
    args = parser.parse_args()
    task = bench.crepe_task(args.tones, args.eval_tones)
    evaluation, frequencies = bench.tones(args.eval_tones, seed=2)
    truth = 1200 * np.log2(frequencies / 10.0)

    def errors(model: onnx.ModelProto) -> np.ndarray:
        probabilities = bench._outputs(model, {"frames": evaluation})
        return np.abs(bench.decode_cents(probabilities) - truth)

    original = onnx.load(str(task.model))
    base = errors(original)
    print(f"original: RPA {np.mean(base <= 50):.2%}, {np.mean(base):.1f} cents\n")
    print("| mode | params kept | factorized (g, r) | RPA | cents |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibration.npz"
        np.savez(path, **task.calibration)
        modes = {
            "data-free": CompressionConfig(params=1.0, validate=False, error="bound"),
            "calibrated": CompressionConfig(params=1.0, validate=False, calibration=str(path)),
        }
        for mode, config in modes.items():
            analysis = analyze(task.model, config)
            for budget in args.budgets:
                point = config.replace(params=budget)
                tables = candidate_tables(analysis, point)
                result = realize(analysis, tables, choose(analysis, tables, point), point)
                chosen = ", ".join(
                    f"{layer.name} ({layer.groups}, {layer.rank})"
                    for layer in result.report.compressed_layers
                )
                error = errors(result.model)
                print(
                    f"| {mode} | {budget:.0%} | {chosen} | {np.mean(error <= 50):.2%} "
                    f"| {np.mean(error):.1f} |"
                )
    weight = next(t for t in original.graph.initializer if t.name == CLASSIFIER)
    matrix = numpy_helper.to_array(weight).astype(np.float64)
    left, values, right = np.linalg.svd(matrix, full_matrices=False)
    print(f"\nclassifier {matrix.shape} alone truncated to rank r (original rank {len(values)}):\n")
    print(
        "| r | RPA | cents | wrong→right | right→wrong | McNemar p | median Δ cents "
        "| frames better |"
    )
    print("|---|---|---|---|---|---|---|---|")
    correct = base <= 50
    for rank in args.ranks:
        truncated = onnx.ModelProto()
        truncated.CopyFrom(original)
        approximation = (left[:, :rank] * values[:rank]) @ right[:rank]
        for tensor in truncated.graph.initializer:
            if tensor.name == CLASSIFIER:
                tensor.CopyFrom(
                    numpy_helper.from_array(approximation.astype(np.float32), CLASSIFIER)
                )
        error = errors(truncated)
        better = int(np.sum(~correct & (error <= 50)))
        worse = int(np.sum(correct & (error > 50)))
        print(
            f"| {rank} | {np.mean(error <= 50):.2%} | {np.mean(error):.1f} | {better} | {worse} "
            f"| {mcnemar(better, worse):.2f} | {np.median(error - base):+.2f} "
            f"| {np.mean(error < base):.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
