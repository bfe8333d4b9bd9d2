"""Compress time and peak memory of this checkout against another, in one run. Run by hand:

    python benchmarks/checkouts.py --against PATH [--repeat 3] [--json results.json]

``PATH`` is another checkout of onnx-lowrank (e.g. ``git worktree add ../base <commit>``). On
the ResNet-50-shaped model (``resnet_model.py``, 25.5 M parameters) and the BERT-shaped one
(``transformer.py``, 12 blocks, 85 M weights), it runs ``python -m onnx_lowrank compress MODEL
-o OUT --params 0.5 --max-groups 8 --report R`` (plus ``--extra``) as a subprocess from each
checkout (its folder first on ``sys.path``), the two checkouts alternating, ``--repeat``
times, and prints the median wall time, the peak resident memory (``ru_maxrss``) and the
stage split of each, with the ratio of this checkout to the other. Timings on a shared machine
are noisy: compare the ratios, and read the spread of the wall times printed with each median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet50 import STAGES, machine
from resnet_model import build_resnet50
from transformer import build_transformer

HERE = Path(__file__).resolve().parent.parent


def run(checkout: Path, model: Path, folder: Path, extra: list[str]) -> dict:
    """One compress subprocess from ``checkout``: wall time, peak RSS, stage timings."""
    output, report = folder / "compressed.onnx", folder / "report.json"
    command = [sys.executable, "-m", "onnx_lowrank", "compress", str(model), "-o", str(output)]
    command += ["--params", "0.5", "--max-groups", "8", "--report", str(report), "--quiet"]
    command += extra
    environment = dict(os.environ, PYTHONPATH=str(checkout))
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=checkout, env=environment)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compress failed in {checkout}: {' '.join(command)}")
    data = json.loads(report.read_text())
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "timings": {stage: data["timings"].get(stage, 0.0) for stage in STAGES},
    }


def summary(runs: list[dict]) -> dict:
    return {
        "wall_s": statistics.median(r["wall_s"] for r in runs),
        "all_wall_s": [round(r["wall_s"], 2) for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "timings": {s: statistics.median(r["timings"][s] for r in runs) for s in STAGES},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--extra", default="", help="more compress options for both, e.g. '--no-latency-check'"
    )
    args = parser.parse_args()
    extra = args.extra.split()
    checkouts = {"this": HERE, "other": args.against.resolve()}
    results: dict = {"machine": machine(), "other": str(checkouts["other"]), "models": {}}
    results["extra"] = extra
    models = {"ResNet-50-shaped": build_resnet50, "BERT-shaped": lambda: build_transformer(12)}
    with tempfile.TemporaryDirectory() as folder:
        for label, build in models.items():
            path = Path(folder) / "model.onnx"
            onnx.save(build(), str(path))
            runs: dict[str, list[dict]] = {name: [] for name in checkouts}
            for _ in range(args.repeat):
                for name, checkout in checkouts.items():
                    runs[name].append(run(checkout, path, Path(folder), extra))
                    print(f"{label} {name}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr)
            results["models"][label] = {name: summary(r) for name, r in runs.items()}
    print(f"| model | checkout | wall s (all) | peak RSS MB | {' | '.join(STAGES)} |")
    print("|---|---|---|---:|" + "---:|" * len(STAGES))
    for label, pair in results["models"].items():
        for name, result in pair.items():
            stages = " | ".join(f"{result['timings'][s]:.2f}" for s in STAGES)
            walls = ", ".join(f"{w:.1f}" for w in result["all_wall_s"])
            print(
                f"| {label} | {name} | {result['wall_s']:.1f} ({walls}) | "
                f"{result['peak_rss_mb']:.0f} | {stages} |"
            )
        this, other = pair["this"], pair["other"]
        print(
            f"| {label} | this/other | {this['wall_s'] / other['wall_s']:.2f}× | "
            f"{this['peak_rss_mb'] / other['peak_rss_mb']:.2f}× |" + " |" * len(STAGES)
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
