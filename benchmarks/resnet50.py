"""Speed and memory of onnx-lowrank on a ResNet-50-shaped model. Run by hand:

    python benchmarks/resnet50.py [--repeat 3] [--max-groups 1 4 8] [--json results.json]

It builds the model of ``resnet_model.py`` (53 Conv + 1 Gemm, 25.5 M parameters, random
weights), then measures, in one run:

1. **Spectra**: ``compute_spectra`` (float64 Gram eigenvalues, Grams shared across group counts,
   batched across layers) against the naive method, one ``numpy.linalg.svd(compute_uv=False)``
   per group matrix, for each ``--max-groups``. Both include reading and folding the weights.
   The naive method runs with one BLAS thread (on a busy machine NumPy's default threads make
   it 5-20x slower; ``--threaded-naive`` measures that too); the speed-up is against the
   fastest naive variant measured. All run alternately ``--repeat`` times; the table gives
   medians.
2. **End to end**: ``onnx-lowrank compress MODEL -o OUT --params 0.5 --max-groups 8`` with
   validation, as a subprocess, ``--repeat`` times: wall time, peak resident memory of the
   process (``ru_maxrss`` from ``os.wait4``), and the stage split from its ``--report``. The
   part of the wall time outside the stages (interpreter start, imports, printing) is listed
   as ``startup+other``.

It prints Markdown tables and checks the targets of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from threadpoolctl import threadpool_limits

from onnx_lowrank.backend import get_backend
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize, reconstruct, relative_error
from onnx_lowrank.spectra import compute_spectra, group_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet_model import build_resnet50

STAGES = ("load", "discover", "spectra", "allocate", "factorize", "rewrite", "validate", "save")


def naive_spectra(discovery, max_groups: int) -> None:
    """One float64 SVD per group matrix of every layer and candidate group count."""
    for layer in discovery.layers:
        weight = discovery.weight(layer)
        for groups in group_counts(layer, max_groups):
            width = weight.shape[1] // groups
            for index in range(groups):
                np.linalg.svd(weight[:, index * width : (index + 1) * width], compute_uv=False)


def timed(function, *args) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) of one call."""
    started, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - started, time.process_time() - cpu


def naive_one_thread(discovery, max_groups: int) -> None:
    """The naive method with BLAS limited to one thread (faster on a busy machine)."""
    with threadpool_limits(limits=1, user_api="blas"):
        naive_spectra(discovery, max_groups)


def bench_spectra(
    model_path: Path, max_groups: list[int], repeat: int, device: str, threaded_naive: bool
) -> list[dict]:
    """Median times of the naive method (one BLAS thread; with ``threaded_naive`` also NumPy's
    default threads) and of ``compute_spectra``, run alternately. The speed-up is against the
    fastest naive variant measured."""
    discovery = discover(onnx.load(str(model_path)))
    backend = get_backend(device)
    rows = []
    for limit in max_groups:
        names = ["naive_one_thread", "naive_threaded", "gram"]
        if not threaded_naive:
            names.remove("naive_threaded")
        times: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        calls = {
            "naive_one_thread": (naive_one_thread, discovery, limit),
            "naive_threaded": (naive_spectra, discovery, limit),
            "gram": (compute_spectra, discovery, limit, backend),
        }
        for _ in range(repeat):
            for name in names:
                wall, used = timed(*calls[name])
                times[name].append(wall)
                cpu[name].append(used)
        medians = {key: statistics.median(values) for key, values in times.items()}
        cpu_medians = {key: statistics.median(values) for key, values in cpu.items()}
        baseline = min(value for key, value in medians.items() if key != "gram")
        rows.append(
            {
                "max_groups": limit,
                "group_matrices": sum(
                    groups for layer in discovery.layers for groups in group_counts(layer, limit)
                ),
                **{f"{key}_s": value for key, value in medians.items()},
                **{f"{key}_cpu_s": value for key, value in cpu_medians.items()},
                "speedup": baseline / medians["gram"],
                "cpu_speedup": cpu_medians["naive_one_thread"] / cpu_medians["gram"],
                "backend": f"{backend.name} ({backend.workers} workers)",
                "all_s": times,
            }
        )
        print(f"spectra max-groups {limit}: {rows[-1]}", file=sys.stderr)
    return rows


def bench_big_layer(device: str, shape=(2048, 4608), rank: int = 500) -> dict:
    """``factorize`` of one large random layer against a float64 SVD (one BLAS thread)
    truncated to ``rank``."""
    weight = np.random.default_rng(0).standard_normal(shape)
    backend = get_backend(device)
    norm = float(np.linalg.norm(weight, 2))
    started = time.perf_counter()
    factors = factorize(weight, 1, rank, backend)
    factorize_s = time.perf_counter() - started
    started = time.perf_counter()
    error = relative_error(weight, factors, norm, backend)
    error_s = time.perf_counter() - started
    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        left, values, right = np.linalg.svd(weight, full_matrices=False)
    svd_s = time.perf_counter() - started
    exact = (left[:, :rank] * values[:rank]) @ right[:rank]
    row = {
        "shape": list(shape),
        "rank": rank,
        "factorize_s": factorize_s,
        "relative_error_s": error_s,
        "svd_s": svd_s,
        "max_abs_difference_to_svd": float(np.max(np.abs(reconstruct(factors) - exact))),
        "error_vs_sigma_r1": error * norm / float(values[rank]),
    }
    print(f"big layer: {row}", file=sys.stderr)
    return row


def run_compress(model_path: Path, folder: Path, extra: list[str]) -> dict:
    """One ``onnx-lowrank compress`` subprocess: wall time, peak RSS, stage timings."""
    output, report = folder / "compressed.onnx", folder / "report.json"
    command = [
        sys.executable,
        "-m",
        "onnx_lowrank",
        "compress",
        str(model_path),
        "-o",
        str(output),
        "--params",
        "0.5",
        "--max-groups",
        "8",
        "--report",
        str(report),
        "--quiet",
        *extra,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"compress failed with exit code {process.returncode}: {command}")
    data = json.loads(report.read_text())
    timings = {stage: data["timings"].get(stage, 0.0) for stage in STAGES}
    timings["startup+other"] = wall - sum(timings.values())
    validation = data["validation"] or {}
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "timings": timings,
        "params_fraction": data["params_fraction"],
        "latency_batch": validation.get("latency_batch"),
        "latency_runs": validation.get("latency_runs"),
        "command": " ".join(["onnx-lowrank", *command[3:]]),
    }


def bench_compress(model_path: Path, folder: Path, repeat: int, extra: list[str]) -> dict:
    runs = [run_compress(model_path, folder, extra) for _ in range(repeat)]
    for run in runs:
        print(f"compress: {run['wall_s']:.2f} s, {run['peak_rss_mb']:.0f} MB", file=sys.stderr)
    median = sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2]
    median["all_wall_s"] = [run["wall_s"] for run in runs]
    median["max_peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    return median


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
        "blas_threads_env": {
            key: os.environ[key]
            for key in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            if key in os.environ
        },
    }


def markdown(results: dict) -> str:
    threaded = any("naive_threaded_s" in row for row in results["spectra"])
    header = "| max-groups | group matrices | naive, 1 BLAS thread: wall (CPU) s |"
    header += " naive, default BLAS threads: wall s |" if threaded else ""
    header += " Gram path: wall (CPU) s | speed-up, wall | speed-up, CPU |"
    lines = [header, "|---:" * (7 if threaded else 6) + "|"]
    for row in results["spectra"]:
        cells = [str(row["max_groups"]), str(row["group_matrices"])]
        cells.append(f"{row['naive_one_thread_s']:.2f} ({row['naive_one_thread_cpu_s']:.2f})")
        if threaded:
            cells.append(f"{row['naive_threaded_s']:.2f}")
        cells += [
            f"{row['gram_s']:.2f} ({row['gram_cpu_s']:.2f})",
            f"{row['speedup']:.1f}×",
            f"{row['cpu_speedup']:.1f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    big = results.get("big_layer")
    if big:
        lines += [
            "",
            f"one {big['shape'][0]}×{big['shape'][1]} layer at rank {big['rank']}: "
            f"factorize {big['factorize_s']:.2f} s + actual error {big['relative_error_s']:.2f} s"
            f", float64 SVD (1 thread) {big['svd_s']:.2f} s; max |Ŵ − SVD truncation| "
            f"{big['max_abs_difference_to_svd']:.1e}, actual error / σ_(r+1) "
            f"{big['error_vs_sigma_r1']:.12f}",
        ]
    run = results["compress"]
    total = run["wall_s"]
    lines += ["", "| stage | seconds | share |", "|---|---:|---:|"]
    for stage, seconds in run["timings"].items():
        lines.append(f"| {stage} | {seconds:.2f} | {seconds / total:.0%} |")
    lines.append(f"| **total (wall)** | **{total:.2f}** | |")
    lines.append(f"| total CPU time of the process | {run['cpu_s']:.2f} | |")
    lines.append("")
    lines.append(
        f"peak RSS {run['max_peak_rss_mb']:.0f} MB; wall times of all runs: "
        + ", ".join(f"{t:.2f}" for t in run["all_wall_s"])
        + f" s; latency on batch {run['latency_batch']}, {run['latency_runs']} runs"
    )
    return "\n".join(lines)


def check_targets(results: dict) -> list[str]:
    run = results["compress"]
    eight = [row for row in results["spectra"] if row["max_groups"] == 8]
    others = {k: v for k, v in run["timings"].items() if k not in ("spectra", "startup+other")}
    worst = max(others, key=others.get)
    checks = [
        (f"compress < 20 s: {run['wall_s']:.2f} s", run["wall_s"] < 20),
        (f"peak RSS < 1.5 GB: {run['max_peak_rss_mb']:.0f} MB", run["max_peak_rss_mb"] < 1536),
        (
            f"no stage but spectra > 1/3: {worst} {others[worst] / run['wall_s']:.0%}",
            others[worst] < run["wall_s"] / 3,
        ),
    ]
    if eight:
        checks.append(
            (
                f"spectra >= 10x naive at max-groups 8: {eight[0]['speedup']:.1f}x",
                eight[0]["speedup"] >= 10,
            )
        )
    return [f"{'PASS' if ok else 'FAIL'} {text}" for text, ok in checks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--max-groups", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="spectra backend")
    parser.add_argument("--skip-spectra", action="store_true", help="only the end-to-end run")
    parser.add_argument(
        "--threaded-naive",
        action="store_true",
        help="also time the naive method with NumPy's default BLAS threads",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "compress_args", nargs="*", help="extra arguments for compress (after --)", default=[]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-bench-") as name:
        folder = Path(name)
        model_path = folder / "resnet50_shaped.onnx"
        onnx.save(build_resnet50(), str(model_path))
        results = {"machine": machine()}
        results["spectra"] = (
            []
            if args.skip_spectra
            else bench_spectra(
                model_path, args.max_groups, args.repeat, args.device, args.threaded_naive
            )
        )
        if not args.skip_spectra:
            results["big_layer"] = bench_big_layer(args.device)
        results["compress"] = bench_compress(
            model_path, folder, args.repeat, ["--device", args.device, *args.compress_args]
        )
        results["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps(results["machine"]))
    print(markdown(results))
    print("\n".join(check_targets(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
