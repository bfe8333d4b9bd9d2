"""The best any data-free `g = 1` allocation can do on the MNIST CNN: an exhaustive search.

    python benchmarks/allocation_ceiling.py [--params 0.1] [--json OUT.json]

Every combination of ranks for the three factorizable layers that matter (``features.3``,
``classifier.0`` and ``classifier.2``; ``features.0`` holds 288 weights and stays dense) whose
parameter count fits ``--params`` (of the whole model, biases included, as ``--params``
counts) is built with truncated-SVD factors (each weight replaced by its rank-``r`` product,
which computes what the factorized pair computes) and scored on the 3000 labelled test images.
The allocation is chosen *on the test set itself*, so the best accuracy printed is an upper
bound of what a data-free allocation with truncated-SVD factors and one group reaches: no error
measure, however good, can pick a better ``g = 1`` allocation. Then the tool's own data-free
allocations (``--error bound``, ``max-group``, ``frobenius``, every divisor as group count) are
scored on the same images for comparison.

Needs numpy, onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "samples"))
from mnist import TEST_SET, normalise  # noqa: E402

from onnx_lowrank import CompressionConfig  # noqa: E402
from onnx_lowrank.cost import candidate_params  # noqa: E402
from onnx_lowrank.factorize import factorize, reconstruct  # noqa: E402
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize  # noqa: E402

MODEL = REPO / "samples" / "mnist_cnn.onnx"
#: layer weight -> ranks searched (a rank whose pair would not save weights is skipped)
GRID = {
    "features.3.weight": range(2, 33, 2),
    "classifier.0.weight": range(4, 17),
    "classifier.2.weight": (2, 3, 4, 5, 6, 7, 8, 9, 10),
}


def truncated(weight: np.ndarray, rank: int) -> np.ndarray:
    """The rank-``rank`` product of the tool's own factors (one group), in ``weight``'s shape."""
    matrix = weight.reshape(weight.shape[0], -1).astype(np.float64)
    return reconstruct(factorize(matrix, 1, rank)).reshape(weight.shape).astype(np.float32)


def pair_params(weight: np.ndarray, rank: int) -> int:
    return candidate_params(weight.shape[0], int(np.prod(weight.shape[1:])), 1, rank)


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scores = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float(np.mean(scores.argmax(axis=1) == labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.1)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data = np.load(TEST_SET)
    images, labels = normalise(data["images"]), data["labels"]
    model = onnx.load(str(MODEL))
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    total = sum(w.size for w in weights.values())
    fixed = total - sum(weights[name].size for name in GRID)
    budget = args.params * total
    options = {
        name: [
            (rank, pair_params(weights[name], rank), truncated(weights[name], rank))
            for rank in ranks
            if pair_params(weights[name], rank) < weights[name].size
        ]
        + [(None, weights[name].size, weights[name])]
        for name, ranks in GRID.items()
    }
    rows = []
    for combination in itertools.product(*options.values()):
        params = fixed + sum(option[1] for option in combination)
        if params > budget:
            continue
        trial = onnx.ModelProto()
        trial.CopyFrom(model)
        for init in trial.graph.initializer:
            if init.name in GRID:
                chosen = combination[list(GRID).index(init.name)]
                init.CopyFrom(numpy_helper.from_array(chosen[2], init.name))
        ranks = {name: option[0] for name, option in zip(GRID, combination, strict=True)}
        rows.append(
            {"ranks": ranks, "params": params / total, "accuracy": accuracy(trial, images, labels)}
        )
    rows.sort(key=lambda row: -row["accuracy"])
    original = accuracy(model, images, labels)
    print(f"original: {original:.2%}; {len(rows)} allocations within --params {args.params:g}")
    for row in rows[: args.top]:
        print(f"  {row['accuracy']:.2%} at {row['params']:.3f}: {row['ranks']}")
    tool = {}
    for measure in ("bound", "max-group", "frobenius"):
        config = CompressionConfig(
            params=args.params, error=measure, validate=False, latency_check=False
        )
        analysis = analyze(MODEL, config)
        tables = candidate_tables(analysis, config)
        result = realize(analysis, tables, choose(analysis, tables, config), config)
        tool[measure] = accuracy(result.model, images, labels)
        print(f"  tool, --error {measure}: {tool[measure]:.2%}")
    if args.json:
        args.json.write_text(
            json.dumps({"original": original, "allocations": rows, "tool": tool}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
