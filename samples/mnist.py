"""MNIST sample helper: make validation inputs, and measure test accuracy of models.

    python samples/mnist.py inputs OUT.npz [--count N]
        writes N normalised test images keyed by the model's input name ``input``, for
        ``onnx-lowrank compress --inputs OUT.npz``.

    python samples/mnist.py accuracy MODEL.onnx [MODEL.onnx ...]
        prints the test accuracy of each model on the 3000 labelled test images in
        ``samples/mnist_test.npz``.

Needs numpy and onnxruntime only (both come with ``pip install ".[cpu]"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEST_SET = HERE / "mnist_test.npz"


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, 28, 28)`` images to the model's float32 ``(N, 1, 28, 28)`` input."""
    return ((images.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None, :, :]


def accuracy(model: Path, images: np.ndarray, labels: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predictions = np.concatenate(
        [
            session.run(None, {name: normalise(images[start : start + 500])})[0].argmax(axis=1)
            for start in range(0, len(images), 500)
        ]
    )
    return float(np.mean(predictions == labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inputs = commands.add_parser("inputs", help="write validation inputs as .npz")
    inputs.add_argument("out", type=Path)
    inputs.add_argument("--count", type=int, default=256)
    score = commands.add_parser("accuracy", help="print test accuracy of models")
    score.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args(argv)
    data = np.load(TEST_SET)
    if args.command == "inputs":
        # the last images of the subset, so the accuracy printed below is on other images too
        np.savez(args.out, input=normalise(data["images"][-args.count :]))
        print(f"wrote {args.count} test images to {args.out}")
        return 0
    for model in args.models:
        if not model.is_file():
            print(f"mnist.py: error: model not found: {model}", file=sys.stderr)
            return 2
        score_value = accuracy(model, data["images"], data["labels"])
        print(
            f"{model}: test accuracy {score_value:.2%} on {len(data['labels'])} MNIST test images"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
