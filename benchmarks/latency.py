"""Check the latency ratio onnx-lowrank reports against an independent, bench-style timing.

For each model: compress it (``--params``), then

* the tool: ``validate`` (the code behind the summary's latency line) ``--tool-repeat`` times on
  the original and the compressed model, each reporting median latencies over its interleaved
  pairs; the tool's ratio is ``after / before`` of those medians;
* the bench: its own loop, written without onnx-lowrank's session builder or timing code. Two
  plain ONNX Runtime sessions with the same intra-op thread count, ``--warmup`` untimed runs
  each, then ``--rounds`` rounds that run both models once each, in a random order per round;
  the bench's ratio is the ratio of the two medians.

It prints both ratios and their difference; the tool passes when it is within ``--agree``
(5 %) of the bench. The same batch-1 random input feeds both. Usage::

    python benchmarks/latency.py                                  # MNIST and CREPE tiny
    python benchmarks/latency.py MODEL.onnx --params 0.3 --threads 2 --json out.json

Exit status 1 when a model's ratios disagree by more than ``--agree``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.feeds import random_inputs
from onnx_lowrank.validate import validate

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [
    REPO / "samples" / "mnist_cnn.onnx",
    REPO / "tests" / "models" / "crepe_tiny.onnx",
]


def bench_session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def bench_ratio(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    threads: int,
    warmup: int,
    rounds: int,
    seed: int,
) -> dict[str, float]:
    """Medians of ``rounds`` interleaved runs in a random order per round."""
    sessions = [bench_session(original, threads), bench_session(compressed, threads)]
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    times: list[list[float]] = [[], []]
    order = random.Random(seed)
    for _ in range(rounds):
        pair = [0, 1]
        order.shuffle(pair)
        for index in pair:
            start = time.perf_counter()
            sessions[index].run(None, feeds)
            times[index].append((time.perf_counter() - start) * 1000)
    before, after = statistics.median(times[0]), statistics.median(times[1])
    return {
        "before_ms": before,
        "after_ms": after,
        "ratio": after / before,
        "before_iqr_ms": _iqr(times[0]),
        "after_iqr_ms": _iqr(times[1]),
    }


def _iqr(values: list[float]) -> list[float]:
    quartiles = statistics.quantiles(values, n=4)
    return [quartiles[0], quartiles[2]]


def tool_ratios(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    config: CompressionConfig,
    feeds: dict[str, np.ndarray],
    repeat: int,
) -> list[dict[str, float]]:
    runs = []
    for _ in range(repeat):
        report = validate(original, compressed, config, feeds, "random")
        runs.append(
            {
                "before_ms": report.latency_ms_before,
                "after_ms": report.latency_ms_after,
                "ratio": report.latency_ms_after / report.latency_ms_before,
                "pairs": report.latency_runs,
                "threads": report.latency_threads,
            }
        )
    return runs


def measure(path: Path, args: argparse.Namespace) -> dict:
    config = CompressionConfig(
        params=args.params,
        latency_threads=args.threads,
        latency_runs=args.tool_runs,
        validate=False,
    )
    original = onnx.load(path)
    compressed = compress(original, config).model
    checked = config.replace(validate=True)
    feeds = {
        name: array[:1] for name, array in random_inputs(original, config.input_shapes).items()
    }
    tool = tool_ratios(original, compressed, checked, feeds, args.tool_repeat)
    bench = bench_ratio(
        original, compressed, feeds, args.threads, args.warmup, args.rounds, args.seed
    )
    tool_ratio = statistics.median(run["ratio"] for run in tool)
    return {
        "model": path.name,
        "params": args.params,
        "threads": args.threads,
        "tool_runs": tool,
        "tool_ratio": tool_ratio,
        "tool_ratio_range": [min(r["ratio"] for r in tool), max(r["ratio"] for r in tool)],
        "bench": bench,
        "difference": tool_ratio / bench["ratio"] - 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--params", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tool-runs", type=int, default=CompressionConfig.latency_runs)
    parser.add_argument("--tool-repeat", type=int, default=5, help="validate calls per model")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agree", type=float, default=0.05)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [measure(path, args) for path in args.models]
    print(
        "| model | threads | tool: ratio (median of calls) [range] | tool: ms before -> after "
        "(median call) | bench: ratio | bench: ms before -> after [IQR] | difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        middle = sorted(r["tool_runs"], key=lambda run: run["ratio"])[len(r["tool_runs"]) // 2]
        b = r["bench"]
        print(
            f"| {r['model']} | {r['threads']} | {r['tool_ratio']:.3f} "
            f"[{r['tool_ratio_range'][0]:.3f}-{r['tool_ratio_range'][1]:.3f}] | "
            f"{middle['before_ms']:.3f} -> {middle['after_ms']:.3f} | {b['ratio']:.3f} | "
            f"{b['before_ms']:.3f} [{b['before_iqr_ms'][0]:.3f}-{b['before_iqr_ms'][1]:.3f}] -> "
            f"{b['after_ms']:.3f} [{b['after_iqr_ms'][0]:.3f}-{b['after_iqr_ms'][1]:.3f}] | "
            f"{r['difference']:+.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    disagree = [r["model"] for r in results if abs(r["difference"]) > args.agree]
    if disagree:
        print(f"ratios differ by more than {args.agree:.0%} for: {', '.join(disagree)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
