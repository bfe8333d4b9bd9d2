"""Time of ``fold`` against the number of Conv+BatchNormalization pairs. Run by hand:

    python benchmarks/fold_scaling.py [--pairs 100 200 400 800 1600] [--repeat 3]
        [--against /path/to/other/checkout ...]

It builds chains of ``Conv (no bias) -> BatchNormalization -> Relu`` with ``onnx.helper`` (8
channels, 3x3 kernels, random weights; every BatchNormalization folds, and every fold adds a
bias, so the fresh-name path runs too), writes them to a temporary folder, and times
``onnx_lowrank.fold.fold`` on each (the load is not timed) in a fresh subprocess per checkout and
size, the checkouts taking turns. ``--against PATH`` times the package found in PATH (a source
checkout or worktree, put first on ``sys.path``) beside this checkout's; give it more than once
to compare several. Each cell is the best of ``--repeat`` runs, fewer when one run alone takes
longer than ``--budget`` seconds. It prints a Markdown table: seconds and microseconds per pair
for every checkout, and the growth from one size to the next (2.0 is linear for doubled sizes).

``--graphsurgeon`` also times, in every checkout's workers and alternating with ``fold``, what any
fold written on onnx-graphsurgeon would pay before folding anything: ``gs.import_onnx``,
``graph.cleanup()`` and ``gs.export_onnx`` of the same model, and the same through
``Surgery`` (surgery.py, which restores what a round trip drops) when the package has it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
CHANNELS = 8


def build_chain(pairs: int, seed: int = 0) -> onnx.ModelProto:
    """``pairs`` times ``Conv -> BatchNormalization -> Relu`` on an ``(N, 8, 16, 16)`` input."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "x"
    for index in range(pairs):
        weight = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) / 8
        names = [f"conv{index}.weight"] + [
            f"bn{index}.{part}" for part in ("scale", "bias", "mean", "var")
        ]
        initializers.append(numpy_helper.from_array(weight, names[0]))
        for name, low, high in zip(names[1:], (0.5, -1, -1, 0.5), (1.5, 1, 1, 2), strict=True):
            values = rng.uniform(low, high, CHANNELS).astype(np.float32)
            initializers.append(numpy_helper.from_array(values, name))
        conv, bn = f"conv{index}.out", f"bn{index}.out"
        relu = "y" if index == pairs - 1 else f"relu{index}.out"
        nodes.append(
            helper.make_node("Conv", [current, names[0]], [conv], f"conv{index}", pads=[1] * 4)
        )
        nodes.append(helper.make_node("BatchNormalization", [conv, *names[1:]], [bn], f"bn{index}"))
        nodes.append(helper.make_node("Relu", [bn], [relu], f"relu{index}"))
        current = relu
    graph = helper.make_graph(
        nodes,
        f"chain{pairs}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", CHANNELS, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CHANNELS, 16, 16])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def round_trips(model: onnx.ModelProto) -> dict:
    """The graphsurgeon round trips a fold on graphsurgeon would need, without any fold."""
    import onnx_graphsurgeon as gs

    from onnx_lowrank import graphs

    try:  # surgery.py from the house of issue 13 on; graphs.py before it
        from onnx_lowrank.surgery import Surgery
    except ImportError:
        Surgery = getattr(graphs, "Surgery", None)

    def plain() -> None:
        gs.export_onnx(gs.import_onnx(model).cleanup())

    def surgery() -> None:
        opened = Surgery(model)
        opened.graph.cleanup()
        opened.export()

    trips = {"gs import+cleanup+export": plain}
    if Surgery is not None:
        trips["Surgery+cleanup+export"] = surgery
    return trips


def worker(path: str, repeat: int, budget: float, graphsurgeon: bool) -> None:
    """Time ``fold`` on the model at ``path`` (in this process) and print one JSON line."""
    import onnx_lowrank
    from onnx_lowrank.fold import fold

    model = onnx.load(path)
    folding = None

    def run_fold() -> None:
        nonlocal folding
        folding = fold(model)

    tasks = {"fold": run_fold, **(round_trips(model) if graphsurgeon else {})}
    times: dict[str, list[float]] = {label: [] for label in tasks}
    spent = 0.0
    while len(times["fold"]) < repeat and (not spent or spent + min(times["fold"]) <= budget):
        for label, task in tasks.items():  # alternating, so load changes hit all alike
            start = time.perf_counter()
            task()
            times[label].append(time.perf_counter() - start)
        spent += times["fold"][-1]
    source = str(Path(onnx_lowrank.__file__).resolve().parent.parent)
    best = {label: min(values) for label, values in times.items()}
    print(json.dumps({"best": best.pop("fold"), "runs": len(times["fold"]), "others": best,
                      "folded": len(folding.folded), "source": source}))  # fmt: skip


def measure(checkout: Path, path: Path, repeat: int, budget: float, graphsurgeon: bool) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(checkout))
    command = [sys.executable, __file__, "--worker", str(path), "--repeat", str(repeat)]
    command += ["--budget", str(budget)] + (["--graphsurgeon"] if graphsurgeon else [])
    done = subprocess.run(
        command, env=environment, cwd=checkout, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"{checkout}: fold failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["source"]) != checkout.resolve():
        raise SystemExit(f"{checkout}: imported onnx_lowrank from {result['source']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[100, 200, 400, 800, 1600])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per cell at most")
    parser.add_argument("--against", type=Path, action="append", default=[], metavar="PATH")
    parser.add_argument(
        "--graphsurgeon", action="store_true", help="also time graphsurgeon round trips"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeat, args.budget, args.graphsurgeon)
        return
    checkouts = [REPO, *args.against]
    labels = [str(checkout) for checkout in checkouts]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, onnx {onnx.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for pairs in args.pairs:
            path = Path(folder) / f"chain{pairs}.onnx"
            onnx.save(build_chain(pairs), path)
            row = [
                measure(checkout, path, args.repeat, args.budget, args.graphsurgeon)
                for checkout in checkouts
            ]
            folded = {result["folded"] for result in row}
            if folded != {pairs}:
                raise SystemExit(f"{pairs} pairs: folded {folded}")
            rows.append((pairs, row))
            cells = ", ".join(f"{r['best']:.3f} s" for r in row)
            print(f"{pairs} pairs: {cells}", file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for position, label in enumerate(labels):
        print(f"\n[{position}] {label}")
    header = "| pairs | " + " | ".join(
        f"[{i}] s | [{i}] µs/pair | [{i}] growth" for i in range(len(labels))
    )
    print("\n" + header + " |")
    print("|---:|" + "---:|---:|---:|" * len(labels))
    previous = None
    for pairs, row in rows:
        cells = []
        for position, result in enumerate(row):
            growth = "" if previous is None else f"{result['best'] / previous[position]:.2f}×"
            runs = "" if result["runs"] == args.repeat else f" ({result['runs']} run)"
            per_pair = 1e6 * result["best"] / pairs
            cells.append(f"{result['best']:.3f}{runs} | {per_pair:.0f} | {growth}")
        print(f"| {pairs} | " + " | ".join(cells) + " |")
        previous = [result["best"] for result in row]
    for position in range(len(labels) if args.graphsurgeon else 0):
        trips = list(rows[0][1][position]["others"])
        print(f"\n[{position}] graphsurgeon round trips without a fold (same runs as its fold; "
              "× = their time / fold's)\n")  # fmt: skip
        print("| pairs | fold s | " + " | ".join(f"{trip} s | ×" for trip in trips) + " |")
        print("|---:|---:|" + "---:|---:|" * len(trips))
        for pairs, row in rows:
            fold_time, others = row[position]["best"], row[position]["others"]
            cells = [f"{others[trip]:.3f} | {others[trip] / fold_time:.1f}×" for trip in trips]
            print(f"| {pairs} | {fold_time:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
